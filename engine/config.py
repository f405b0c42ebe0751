"""Training configuration: one dataclass tree, filled from defaults < a yaml/toml file < the command line.

Keys are ms-swift `sft` flag names where one exists (``--learning_rate``, ``--max_length``...). Every key is
unique across the groups, so a config file may be flat (``learning_rate: 1e-5``) or grouped by section
(``optim: {learning_rate: 1e-5}``). Unknown keys and bad values raise ``ValueError`` naming the key (and file).
Only engine/train.py sees the whole tree; every other module takes the few values it needs as arguments.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelConfig:
    model: str = "debug-qwen2"  # HF directory or an engine.models flavour name (random init)
    tokenizer: str | None = None  # default: the model directory / debug flavour
    torch_dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float32"))
    attn_impl: str = "auto"  # passed to engine.models (auto | flash | sdpa | ...)
    loss_impl: str = field(default="auto", metadata=_choices("auto", "triton", "torch"))
    loss_recompute: bool = False  # long-ce's exact low-memory mode: 8NHV FLOPs, extra <= dX + dW + 256 MiB
    # chat template: None = the checkpoint's own (chat_template.jinja / tokenizer_config.json), else the
    # built-in of its vocabulary; a name (ms-swift's) replaces it: qwen, qwen2_5, chatml, glm4, llama3, longwriter
    template: str | None = None
    system: str | None = None  # the system prompt of conversations without one (written into the export)


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=list)  # "path" or "path#N"
    val_dataset: list[str] = field(default_factory=list)
    max_length: int = 28672  # the LongWriter recipe's row budget
    packing: bool = True
    split_dataset_ratio: float = 0.0
    lazy_tokenize: bool = False
    # where lazy_tokenize caches token lengths (keyed by file content + tokenizer + template);
    # None: output_dir/cache, so a resumed run (or a second stage in the same output_dir) skips the pass
    dataset_cache_dir: str | None = None
    dataloader_num_workers: int = 0
    truncation_strategy: str = field(default="delete", metadata=_choices("delete", "truncate"))
    # bad rows: "error" stops naming file, line and field; "warning" skips, counts and reports them
    check_dataset_strategy: str = field(default="error", metadata=_choices("error", "warning"))


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    lr_scheduler_type: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_ratio: float = 0.0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8


@dataclass
class TrainConfig:
    batch_size: int = 1  # rows per micro-batch per rank
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    seed: int = 42
    # true (ms-swift's bool: full checkpointing of every k-th block), false, or "selective" (op-level:
    # attention and every other matmul output kept; engine.parallel.apply_activation_checkpointing)
    gradient_checkpointing: bool | str = field(default=True, metadata=_choices("true", "false", "selective"))
    gradient_checkpointing_every: int = 1  # checkpoint every k-th decoder layer
    # micro-batches of fewer tokens (B x T) are not checkpointed: for unpacked rows of varying length
    gradient_checkpointing_min_tokens: int = 0
    compile: bool = False  # torch.compile each decoder block (inductor), after checkpointing, before FSDP
    neftune_noise_alpha: float = 0.0  # 0 = off
    # long-ce: every target token of a step weighs the same; sequence: every document (THUDM's pack loss);
    # mean: each micro-batch's token mean
    loss_name: str = field(default="long-ce", metadata=_choices("long-ce", "sequence", "mean"))
    # options of the fused loss (kernels.linear_cross_entropy), in training and evaluation alike (as HF):
    label_smoothing_factor: float = 0.0  # HF TrainingArguments' name (ms-swift inherits it)
    z_loss: float = 0.0  # + z_loss * logsumexp(logits)^2 per target token (PaLM's auxiliary loss, 1e-4)
    max_nonfinite_steps: int = 5  # abort after this many skipped (NaN/inf) steps in a row
    # seconds a collective may wait before the process group aborts (HF's default; ms-swift's is ~infinite)
    ddp_timeout: int = 1800


@dataclass
class RLHFConfig:
    """Preference training (ms-swift `rlhf` / TRL DPOConfig names). rlhf_type None: SFT."""

    rlhf_type: str | None = field(default=None, metadata=_choices("dpo"))
    beta: float = 0.1
    rpo_alpha: float | None = None  # weight of the chosen responses' NLL (RPO); None = off
    loss_type: str = field(default="sigmoid", metadata=_choices("sigmoid", "ipo", "hinge"))
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only): the chance a pair's label is flipped
    ref_model: str | None = None  # HF directory or flavour name; None: the starting model (--model)
    # one pass of the frozen reference over the data before training, cached with the dataset cache (keyed by
    # data, reference and dtype), so no reference model is resident during training
    precompute_ref_log_probs: bool = False


@dataclass
class CheckpointConfig:
    output_dir: str = "output"
    save_steps: int = 500  # 0 = only at the end (and on SIGTERM)
    save_total_limit: int | None = None  # None (or -1): keep every checkpoint
    save_only_model: bool = False
    # what a SIGTERM (preemption, torchrun / scheduler shutdown) saves before exiting: "full" (exact resume),
    # "model" (weights + data/schedule/RNG position, ~1/3 of the bytes: resume restarts AdamW's moments), "none"
    save_on_sigterm: str = field(default="full", metadata=_choices("full", "model", "none"))
    save_final: bool = True  # output_dir/final: consolidated HF safetensors
    final_dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float32"))
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest"
    resume_only_model: bool = False


@dataclass
class LogConfig:
    eval_steps: int = 0  # 0 = no evaluation during training
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=list)  # "tensorboard"
    progress_bar: bool = True
    # "A,B" (or "A"): torch.profiler trace + CUDA memory snapshot of optimizer steps A..B into output_dir/profile
    profile_steps: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# key -> (group name, dataclasses.Field, resolved type)
def _key_table() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    table = {}
    for group in dataclasses.fields(Config):
        section = type(group.default_factory())
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            assert f.name not in table, f"duplicate config key {f.name}"
            table[f.name] = (group.name, f, hints[f.name])
    return table


KEYS = _key_table()
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
# ms-swift spellings: --torch_dtype bf16, --save_total_limit -1 (keep all)
_ALIASES = {
    ("torch_dtype", "bf16"): "bfloat16",
    ("torch_dtype", "fp32"): "float32",
    ("final_dtype", "bf16"): "bfloat16",
    ("final_dtype", "fp32"): "float32",
    ("save_total_limit", -1): None,
}


def _convert(key: str, value: Any, where: str) -> Any:
    """Turn a string (command line) or a native value (config file) into the key's type."""
    _, f, tp = KEYS[key]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args == [bool, str]:  # a bool or a named mode: true | false | <choice>
            return _bool_or_choice(key, value, f.metadata["choices"], where)
        optional, tp = True, args[0]
    bad = ValueError(f"bad value {value!r} for '{key}' ({where}): expected {getattr(tp, '__name__', tp)}")
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list | tuple) else [value]
        out = []
        for item in items:  # "a,b" on the command line is two items
            out += [s for s in item.split(",") if s] if isinstance(item, str) else [item]
        if not all(isinstance(x, str) for x in out):
            raise bad
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    try:
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise bad
            out = int(value) if not isinstance(value, str) else int(value, 10)
        elif tp is float:
            if isinstance(value, bool):
                raise bad
            out = float(value)
            if not math.isfinite(out):
                raise bad
        else:
            out = str(value)
    except (TypeError, ValueError):
        raise bad from None
    out = _ALIASES.get((key, out), out)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ValueError(f"bad value {value!r} for '{key}' ({where}): choose one of {', '.join(choices)}")
    return out


def _bool_or_choice(key: str, value: Any, choices: tuple[str, ...], where: str) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"bad value {value!r} for '{key}' ({where}): choose one of {', '.join(choices)}")


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} does not exist")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(p.read_text()) or {}
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(p.read_text())
    else:
        raise ValueError(f"config file {path}: use .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping")
    flat: dict[str, Any] = {}
    groups = {g.name for g in dataclasses.fields(Config)}
    for key, value in data.items():
        if key in groups and isinstance(value, dict):  # grouped form
            items = value.items()
        else:
            items = [(key, value)]
        for k, v in items:
            if k not in KEYS:
                raise ValueError(f"unknown key '{k}' in config file {path}")
            flat[k] = _convert(k, v, f"config file {path}")
    return flat


def _parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`--key value`, `--key=value`, bare `--flag` for booleans, `--dataset a b c` for lists."""
    config_file, out, i = None, {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r} (flags look like --key value)")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_") if key.replace("-", "_") in KEYS or key == "config" else key
        if key != "config" and key not in KEYS:
            raise ValueError(f"unknown flag --{key}")
        i += 1
        if eq:
            values = [value]
        else:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        if key == "config":
            if len(values) != 1:
                raise ValueError("--config takes one file")
            config_file = values[0]
            continue
        tp = KEYS[key][2]
        if not values:
            if tp is not bool and tp != bool | str:
                raise ValueError(f"flag --{key} needs a value")
            values = ["true"]
        is_list = typing.get_origin(tp) is list
        if len(values) > 1 and not is_list:
            raise ValueError(f"flag --{key} takes one value, got {values}")
        out[key] = _convert(key, values if is_list else values[0], "command line")
    return config_file, out


def step_range(text: str | None) -> tuple[int, int] | None:
    """--profile_steps "A,B" (or "A") -> (A, B), 1-based optimizer steps, inclusive; ValueError if malformed."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        first, last = int(parts[0]), int(parts[-1])
    except ValueError:
        first = last = 0
    if len(parts) > 2 or not 1 <= first <= last:
        raise ValueError(
            f"bad value {text!r} for 'profile_steps': expected A,B with 1 <= A <= B (or one step A)"
        )
    return first, last


def validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ValueError(f"bad value for '{key}': {msg}")

    d, o, t, c, lg = cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.log
    from engine.data.template import BUILTIN_TEMPLATES

    names = [*BUILTIN_TEMPLATES, "longwriter"]
    need(cfg.model.template in (None, *names), "template", f"unknown template; built-in: {', '.join(names)}")
    need(d.max_length > 0, "max_length", "must be > 0")
    need(0.0 <= d.split_dataset_ratio < 1.0, "split_dataset_ratio", "must be in [0, 1)")
    need(
        not (d.val_dataset and d.split_dataset_ratio > 0),
        "split_dataset_ratio",
        "a validation set comes from --val_dataset or from a split of --dataset, not both (set one of them)",
    )
    need(d.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
    need(o.learning_rate > 0, "learning_rate", "must be > 0")
    need(0.0 <= o.warmup_ratio <= 1.0, "warmup_ratio", "must be in [0, 1]")
    need(o.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(o.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
    need(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "adam_beta1/adam_beta2", "must be in [0, 1)")
    need(t.batch_size > 0, "batch_size", "must be > 0")
    need(t.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
    need(t.num_train_epochs > 0 or t.max_steps > 0, "num_train_epochs", "must be > 0 (or set max_steps)")
    need(t.max_steps == -1 or t.max_steps > 0, "max_steps", "must be -1 (use epochs) or > 0")
    need(t.gradient_checkpointing_every >= 1, "gradient_checkpointing_every", "must be >= 1")
    need(t.gradient_checkpointing_min_tokens >= 0, "gradient_checkpointing_min_tokens", "must be >= 0")
    need(t.neftune_noise_alpha >= 0, "neftune_noise_alpha", "must be >= 0")
    need(t.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
    need(0 <= t.label_smoothing_factor < 1, "label_smoothing_factor", "must be in [0, 1)")
    need(t.z_loss >= 0, "z_loss", "must be >= 0")
    need(t.ddp_timeout > 0, "ddp_timeout", "must be > 0 (seconds)")
    need(c.save_steps >= 0, "save_steps", "must be >= 0")
    need(c.save_total_limit is None or c.save_total_limit >= 1, "save_total_limit", "must be >= 1")
    need(
        not c.resume_only_model or c.resume_from_checkpoint,
        "resume_only_model",
        "needs resume_from_checkpoint",
    )
    need(lg.eval_steps >= 0, "eval_steps", "must be >= 0")
    need(lg.logging_steps >= 1, "logging_steps", "must be >= 1")
    step_range(lg.profile_steps)
    for r in lg.report_to:
        need(r in ("tensorboard", "none"), "report_to", f"unknown backend {r!r} (tensorboard | none)")
    need(bool(d.dataset), "dataset", "at least one dataset is required")
    r = cfg.rlhf
    if r.rlhf_type is None:  # a DPO flag without --rlhf_type dpo would silently do nothing
        for key, default in dataclasses.asdict(RLHFConfig()).items():
            need(getattr(r, key) == default, key, "is a DPO flag: set --rlhf_type dpo (or drop it)")
    else:
        need(t.loss_name == "long-ce", "loss_name", "is the SFT loss; DPO's loss is --loss_type")
        for key in ("label_smoothing_factor", "z_loss"):  # they would change DPO's log-probs, not its loss
            need(getattr(t, key) == 0, key, "is an SFT loss option; DPO's smoothing is --label_smoothing")
        need(r.beta > 0, "beta", "must be > 0")
        need(0.0 <= r.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        need(
            r.label_smoothing == 0 or r.loss_type == "sigmoid",
            "label_smoothing",
            f"applies to loss_type sigmoid only (got loss_type {r.loss_type})",
        )
        need(r.rpo_alpha is None or r.rpo_alpha >= 0, "rpo_alpha", "must be >= 0")


def parse_config(argv: list[str] | None = None, *, check: bool = True) -> Config:
    """Defaults < `--config FILE` < command-line flags; raises ValueError on unknown keys or bad values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file, cli = _parse_argv(argv)
    values = _load_file(config_file) if config_file else {}
    values.update(cli)
    cfg = Config()
    for key, value in values.items():
        setattr(getattr(cfg, KEYS[key][0]), key, value)
    if check:
        validate(cfg)
    return cfg


def usage() -> str:
    lines = ["usage: python -m engine.train [--config FILE] [--key value ...]", ""]
    defaults = Config()
    for key, (group, f, tp) in KEYS.items():
        choices = f.metadata.get("choices")
        hint = "|".join(choices) if choices else getattr(tp, "__name__", str(tp))
        lines.append(f"  --{key:<32} {hint:<28} default {getattr(getattr(defaults, group), key)!r}")
    return "\n".join(lines)
