"""Class vocabularies of the datasets, in the official orders."""

from __future__ import annotations

# AVE categories.txt, line number = class index; 28 = background.
AVE_CATEGORIES = [
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
    "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle",
    "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry",
    "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush", "Rodents, rats, mice",
    "Accordion", "Mandolin",
]
AVE_BACKGROUND = 28
AVE_SEGMENTS = 10

# LLP / AVVP: the list in AVVP-ECCV20 dataloader.py / main_avvp.py, in that order.
AVVP_CATEGORIES = [
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce",
    "Fire_alarm", "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle",
    "Vacuum_cleaner", "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter",
    "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
]
AVVP_SEGMENTS = 10

# AVSBench-object S4 categories (23); MS3 has no per-video category.
AVS_S4_CATEGORIES = [
    "ambulance_siren", "baby_laughter", "cap_gun_shooting", "cat_meowing",
    "chainsawing_trees", "coyote_howling", "dog_barking", "driving_buses", "female_singing",
    "helicopter", "horse_clip-clop", "lawn_mowing", "lions_roaring", "male_speech",
    "mynah_bird_singing", "playing_acoustic_guitar", "playing_glockenspiel", "playing_piano",
    "playing_tabla", "playing_ukulele", "playing_violin", "race_car", "typing_on_computer_keyboard",
]
AVS_SEGMENTS = 5

# MUSIC-AVQA question types (type, subtype), the groups of the official breakdown.
AVQA_QUESTION_TYPES = [
    ("Audio", "Counting"), ("Audio", "Comparative"),
    ("Visual", "Counting"), ("Visual", "Location"),
    ("Audio-Visual", "Existential"), ("Audio-Visual", "Counting"),
    ("Audio-Visual", "Location"), ("Audio-Visual", "Comparative"),
    ("Audio-Visual", "Temporal"),
]
AVQA_SEGMENTS = 10
AVQA_MAX_QUESTION_LEN = 14
