"""Typed configuration of a training (or evaluation) run: ``TrainConfig``, in sections.

What the *trainer* decides lives here (paths, cluster shape, DeepSpeed, ingest, checkpoints,
evaluation, OGM-GE, telemetry); the model config is the task's (``task.config(preset,
**model)``), and so are the optimisation defaults (``task.training_defaults(preset)``): an
``optim`` field left ``None`` takes the task's value (../shared/spec/avmoe.md §3).

Overrides use the one grammar of ``avmoe.config.apply_overrides``: a field's own name when it is
unique (``keep_checkpoints=3``, ``lr=1e-4``, ``workers=4``), or its path
(``checkpoint.keep_checkpoints=3``); ``model.<key>=value`` goes to the task's model config
(``model.adapter.num_tokens=8``); a task with variants takes its variant under the task's own
option name (AVS: ``setting=ms3``). String values are parsed by the field's type.

``TrainConfig.validate()`` checks every section and builds the task's model config and
schedule too, so every mistake a user can make in a config (unknown key, wrong type, bad
choice, OGM-GE on a task without it) is a ``ConfigError`` naming the key, raised on the driver
before any Ray resource is taken.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from avmoe.config import Config, ConfigError, OptimConfig, apply_overrides


@dataclass
class PathsConfig(Config):
    data: str | None = None  # shard URL (local path, file://, s3://...) holding {split}.manifest.json
    # shard URL of the validation and test splits when they come from another dataset than the
    # training split (a task's split_datasets, e.g. CMG's AVE -> AVVP); None = data
    eval_data: str | None = None
    storage: str = "runs"  # checkpoints + results: local path or s3://...
    name: str | None = None  # run name; re-running with the same name resumes from its latest checkpoint
    train_split: str = "train"
    val_split: str = "val"  # model selection (best checkpoint) is always on this split
    test_split: str = "test"

    def url(self, split: str) -> str | None:
        """The shard URL a split is read from."""
        return self.data if split == self.train_split or not self.eval_data else self.eval_data


@dataclass
class ScaleConfig(Config):
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # worker-group restarts from the latest checkpoint (FailureConfig); -1 = forever
    # Ray resources every training worker also asks for, e.g. trainer=1 to keep workers on the
    # trainer node type and off the CPU-only ingest nodes (cluster/*.yaml)
    worker_resources: dict[str, float] | None = None
    # elastic: Ray Train starts (and restarts after a node loss) with as many workers as the
    # cluster holds, between min_workers and workers; the ingest re-deals the rest of the epoch
    # to the new world size. None = exactly `workers`.
    min_workers: int | None = None
    # a drained node (spot preemption notice: `ray drain-node`, the autoscaler, KubeRay) makes
    # every rank checkpoint at the next step boundary and hand the group back to Ray Train
    checkpoint_on_preemption: bool = True

    def check(self, prefix: str = "") -> None:
        _at_least(prefix, self, ("workers", "min_workers"), 1)
        _at_least(prefix, self, ("gpus_per_worker", "cpus_per_worker"), 0)
        if self.max_failures < -1:
            raise ConfigError(f"{prefix}max_failures must be >= -1 (-1 = retry forever)")
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ConfigError(f"{prefix}min_workers ({self.min_workers}) must be <= workers ({self.workers})")
        for k, v in (self.worker_resources or {}).items():
            if k in ("CPU", "GPU"):
                raise ConfigError(f"{prefix}worker_resources: {k} is set by "
                                  f"{'cpus' if k == 'CPU' else 'gpus'}_per_worker")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{prefix}worker_resources: {k}={v!r} must be a number >= 0")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers


@dataclass
class LoopConfig(Config):
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the released scripts do not clip)
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    limit_train_batches: int | None = None  # per epoch and rank (smoke runs)
    limit_eval_batches: int | None = None

    def check(self, prefix: str = "") -> None:
        _at_least(prefix, self, ("max_steps", "limit_train_batches", "limit_eval_batches"), 1)
        _at_least(prefix, self, ("grad_clip",), 0)


@dataclass
class DeepSpeedConfig(Config):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    deepspeed_config: str | None = None  # JSON file or inline JSON merged over ours

    def overrides(self) -> dict[str, Any]:
        """The user's DeepSpeed JSON (file or inline), as a dict."""
        if not self.deepspeed_config:
            return {}
        text = self.deepspeed_config
        try:
            if not text.lstrip().startswith("{"):
                with open(text) as f:
                    text = f.read()
            d = json.loads(text)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed_config: cannot read {self.deepspeed_config!r}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("deepspeed_config: must be a JSON object")
        return d

    def check(self, prefix: str = "") -> None:
        self.overrides()  # parse errors name the key


@dataclass
class IngestSection(Config):
    shuffle_buffer: int = 256
    read_concurrency: int | None = None
    prefetch_batches: int = 2
    on_error: Literal["raise", "skip"] = "raise"  # bad samples: raise, or skip (counted in the metrics)
    decode_cpus: float | None = None  # CPUs of one decode task (None = ingest default, 1)
    # Ray resources of one decode task, e.g. ingest=1 to place decoding on the CPU-only ingest
    # nodes of cluster/*.yaml (their custom resource); CPU defaults to decode_cpus
    decode_resources: dict[str, float] | None = None
    # where JPEG frames are decoded (data_pipeline.ingest, bench/README.md "Decode placement"):
    # ingest = the decode tasks, trainer = a thread pool in each training worker, gpu = nvJPEG on
    # the worker's GPU, auto = ingest when decode_resources names a custom resource (ingest nodes)
    # or the worker has a GPU, else trainer
    decode_on: Literal["auto", "ingest", "trainer", "gpu"] = "auto"
    decode_threads: int | None = None  # decode_on=trainer: threads per worker (None = its CPUs)

    def check(self, prefix: str = "") -> None:
        _at_least(prefix, self, ("shuffle_buffer", "read_concurrency", "prefetch_batches",
                                 "decode_threads"), 1)
        _at_least(prefix, self, ("decode_cpus",), 0)
        for k, v in (self.decode_resources or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{prefix}decode_resources: {k}={v!r} must be a number >= 0")

    def resources(self) -> dict[str, float] | None:
        """The decode task's Ray resources (None = the ingest's default, 1 CPU)."""
        if self.decode_resources is None and self.decode_cpus is None:
            return None
        res = dict(self.decode_resources or {})
        res.setdefault("CPU", self.decode_cpus if self.decode_cpus is not None else 1.0)
        return res


@dataclass
class CheckpointConfig(Config):
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps (mid-epoch)
    keep_checkpoints: int = 2  # best on validation + latest are always among them

    def check(self, prefix: str = "") -> None:
        _at_least(prefix, self, ("checkpoint_every", "keep_checkpoints"), 1)


@dataclass
class EvalConfig(Config):
    eval_only: str | None = None  # checkpoint path/URL: evaluate it on the test split, no training
    eval_drop: Literal["audio", "visual"] | None = None  # also report the metric with that modality absent
    test: bool = True  # evaluate the best (validation) checkpoint on the test split at the end
    plots: bool = True


@dataclass
class OGMConfig(Config):
    """OGM-GE (../shared/spec/related-methods.md §1), for tasks with ``supports_ogm``."""

    modulation: Literal["none", "ogm", "ogm_ge"] = "none"
    ogm_alpha: float = 0.1
    ogm_start_epoch: int = 0
    ogm_end_epoch: int = 50

    def check(self, prefix: str = "") -> None:
        _at_least(prefix, self, ("ogm_alpha",), 0)


@dataclass
class TelemetryConfig(Config):
    """avmoe.telemetry.WorkerMetrics."""

    metrics: bool = True
    metrics_address: str | None = None  # None = telemetry's default bind address
    metrics_port: int | None = None  # None = telemetry's default; 0 = any free port
    metrics_sd_dir: str | None = None  # Prometheus file-SD directory; None = $AVMOE_METRICS_SD_DIR or its default, "" = none
    # experiment tracking backends, comma-separated: tensorboard (event files under
    # <storage>/<name>/tensorboard/), mlflow, wandb (where their package is installed), or none
    tracking: str = "tensorboard"

    def check(self, prefix: str = "") -> None:
        import os

        from avmoe.tracking import parse_backends

        parse_backends(self.tracking, f"{prefix}tracking")
        # the workers read the AVMOE_METRICS_* settings the driver forwards: check them here

        if self.metrics_port is not None:
            _check_port(f"{prefix}metrics_port", self.metrics_port)
        if self.metrics_address is not None:
            _check_address(f"{prefix}metrics_address", self.metrics_address)
        env = os.environ
        if env.get("AVMOE_METRICS_ADDR"):
            _check_address("AVMOE_METRICS_ADDR", env["AVMOE_METRICS_ADDR"])
        base = _env_int("AVMOE_METRICS_PORT", env.get("AVMOE_METRICS_PORT"))
        slots = _env_int("AVMOE_METRICS_PORT_SLOTS", env.get("AVMOE_METRICS_PORT_SLOTS"))
        if base is not None:
            _check_port("AVMOE_METRICS_PORT", base)
        if slots is not None and (slots < 1 or (base or 0) + slots - 1 > 65535):
            raise ConfigError(f"AVMOE_METRICS_PORT_SLOTS must be >= 1 and keep the ports within "
                              f"65535; got {slots}")


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _check_port(key: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key} must be a TCP port in 1..65535 (0 = any free port); got {port}")


def _check_address(key: str, value: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise ConfigError(f"{key} must be an IP address or a host name to bind (no scheme, no "
                          f"port: the port is metrics_port); got {value!r}")


def _env_int(key: str, text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{key} must be an integer; got {text!r}") from None


@dataclass
class TrainConfig(Config):
    task: str = ""  # a registered task (avmoe.tasks.list_tasks())
    variant: str | None = None  # the task's variant (AVS: s4 | ms3, the option ``setting``); None = its default
    preset: Literal["tiny", "paper", "official"] = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # model-config overrides (model.<key>=value)
    paths: PathsConfig = field(default_factory=PathsConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # None fields = the task's defaults
    loop: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ingest: IngestSection = field(default_factory=IngestSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    ogm: OGMConfig = field(default_factory=OGMConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, **overrides: Any) -> "TrainConfig":
        """``TrainConfig.of(task=name, data=url, workers=2, lr=1e-3, ...)``: any override keys
        (not validated yet: call ``validate()``)."""
        return cls().apply(overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The inverse of ``to_dict()`` (results.json, checkpoints)."""
        return cls().apply(d)

    def apply(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """Set override keys in place (see the module docstring); returns self."""
        for key, value in overrides.items():
            if key.startswith("model."):
                self.model[key[len("model."):]] = value
                continue
            if key in ("task", "variant"):  # first: the task decides the variant option's name
                apply_overrides(self, {key: value}, validate=False)
                continue
            if self.task and key == self._variant_option():
                key = "variant"
            apply_overrides(self, {key: value}, validate=False)
        return self

    def _variant_option(self) -> str | None:
        """The task's name for its variant (AVS: "setting"), accepted as an alias of ``variant``."""
        from avmoe.tasks import TASKS

        return TASKS.get(self.task).variant_option if self.task in TASKS else None

    # ------------------------------------------------------------------ derived

    def get_task(self):
        """The task object, bound to this config's variant."""
        from avmoe.tasks import TASKS

        if not self.task:
            raise ConfigError("task: no task given")
        if self.task not in TASKS:
            from avmoe.tasks import list_tasks

            raise ConfigError(f"task must be one of {', '.join(list_tasks())}; got {self.task!r}")
        return TASKS.get(self.task)(self.variant)

    def run_name(self) -> str:
        return self.paths.name or f"{self.get_task().full_name}-{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}"

    def task_config(self):
        """The typed model config (the task's preset + ``model`` overrides)."""
        task = self.get_task()
        base = task.config(preset=self.preset)
        try:
            return apply_overrides(base, dict(self.model), prefix="model.")
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("model.") else f"model config: {msg}") from None

    def resolved_optim(self) -> OptimConfig:
        """The task's training defaults with this config's explicit ``optim`` values on top."""
        opt = self.get_task().training_defaults(self.preset).merged(self.optim)
        opt.validate("optim.")
        opt.check_complete("optim.")
        return opt

    # ------------------------------------------------------------------ validation

    def check(self, prefix: str = "") -> None:
        task = self.get_task()  # unknown task or variant: named here
        if not self.paths.data and not self.evaluation.eval_only:
            raise ConfigError("data: no shard URL given (--data URL, e.g. "
                              f"s3://bucket/shards/{task.dataset})")
        if not self.paths.storage:
            raise ConfigError("storage: no storage URL given (--storage URL)")
        if self.ogm.modulation != "none":
            if not task.supports_ogm:
                raise ConfigError(f"modulation: OGM-GE is not supported by task {task.name!r} "
                                  "(it needs per-modality class posteriors)")
            if self.deepspeed.zero_stage != 0:
                # ZeRO >= 1 keeps the reduced gradients in DeepSpeed's partitioned flat buffers,
                # not in param.grad, so there is no per-parameter tensor to modulate after the
                # all-reduce; see avmoe/train/ogm.py.
                raise ConfigError(f"modulation={self.ogm.modulation!r} needs zero_stage=0 "
                                  f"(got zero_stage={self.deepspeed.zero_stage}); see avmoe/train/ogm.py")
        if self.scale.elastic and self.deepspeed.zero_stage != 0:
            # ZeRO >= 1 partitions the optimizer state by data-parallel rank: a checkpoint of N
            # ranks does not load on N-1 (DeepSpeed's universal checkpoint conversion would)
            raise ConfigError(f"min_workers={self.scale.min_workers} (elastic) needs zero_stage=0; got "
                              f"zero_stage={self.deepspeed.zero_stage} (its checkpoints load only on the "
                              "same number of workers)")
        if self.ingest.decode_on == "gpu" and not self.scale.gpus_per_worker > 0:
            raise ConfigError("decode_on='gpu' needs a CUDA device on every training worker (nvJPEG); "
                              f"got gpus_per_worker={self.scale.gpus_per_worker:g}: set gpus_per_worker, "
                              "or decode_on=trainer|ingest")
        self.task_config()
        self.resolved_optim()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_key(key: str, task=None) -> str:
    """``--help`` text of a TrainConfig key: its type or choices and its default (the task's own
    for the optimisation fields: the paper preset's and the embedded demo's)."""
    from avmoe.config import describe, field_type, resolve_key

    cfg = TrainConfig()
    path = resolve_key(cfg, key)
    obj = cfg
    for p in path[:-1]:
        obj = getattr(obj, p)
    default = getattr(obj, path[-1])
    text = describe(field_type(cfg, path)).replace(" or none", "")
    if path[0] == "optim" and task is not None:
        paper = getattr(task.training_defaults("paper"), path[-1])
        demo = task.demo_schedule.get(path[-1], paper)
        return f"{text}; default: the task's ({paper} for the paper preset, {demo} in the embedded demo)"
    if key == "storage":
        return f"{text}; default: $AVMOE_STORAGE, else ~/.local/share/avmoe/runs"
    if key == "data":
        return f"{text} (shard URL); default: none = the embedded demo (synthetic data)"
    if key == "name":
        return f"{text}; default: generated (<task>-<preset>-<date>-<time>); an existing run's name resumes it"
    return f"{text}; default: {default!r}"


def _at_least(prefix: str, cfg: Config, names: tuple[str, ...], low: float) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < low:
            raise ConfigError(f"{prefix}{name} must be >= {low:g}; got {v}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}`` (values stay text: the fields' types parse them)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out
