"""What every ``mogu`` command shares: the model options, the path checks that run before
the model loads, model loading, and the one-line error report.

A command's ``func(args)`` raises on bad input; :func:`run` turns any exception into one
line ``mogu CMD: error: MESSAGE`` on stderr and exit code 1 (the traceback too with
``--debug`` or ``MOGU_DEBUG=1``). Commands check every path they were given (data files,
adapter and MoGU folders, output folder conflicts, the model folder and GGUF file) with
the ``check_*`` functions here before they call :func:`load_inference_model` /
:func:`load_training_model`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Optional, Sequence

DEBUG_ENV = "MOGU_DEBUG"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # mogu/

MODEL_HELP = ("the base model: a local Hugging Face model folder, a folder holding one .gguf file, a .gguf file, "
              "or a Hugging Face hub name (owner/name; downloaded and cached by transformers; tried only when the "
              "value cannot be a local path, refused in offline mode HF_HUB_OFFLINE=1 unless cached) (required)")
GGUF_HELP = ("GGUF file name inside --model (default: the folder's only .gguf file when it has no config.json; "
             "several: name one)")
EXPLAIN_M = "M stands for the base model (--model): a model folder, a folder with one .gguf file, or a hub name."

# Exception types whose message says all; any other type is named in the line.
_PREFIX = re.compile(r"^mogu(?:[ .][A-Za-z_][\w-]*)?: ")
_EXPECTED = (ValueError, OSError, ImportError, KeyError)


# ------------------------------------------------------------------ errors
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``mogu CMD: error: ... (see mogu CMD --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_message(exc: BaseException) -> str:
    """One line for ``exc``: its message with line breaks folded and a leading ``mogu: ``,
    ``mogu.func: `` or ``mogu CMD: `` dropped (the CLI line names the command already)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"missing key {exc.args[0]!r}"
    while True:                 # "mogu: ", "mogu.calibrate: ", "mogu export-vllm: " ...: the line names it
        prefix = _PREFIX.match(text)
        if not prefix:
            break
        text = text[prefix.end():]
    if not isinstance(exc, _EXPECTED):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        text += f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
    return text or type(exc).__name__


def fail(command: str, exc) -> int:
    """Print ``mogu COMMAND: error: ...`` for an exception or a message; returns exit code 1."""
    message = exc if isinstance(exc, str) else error_message(exc)
    print(f"mogu {command}: error: {message}", file=sys.stderr)
    return 1


def debug_enabled(args=None) -> bool:
    if getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def run(args) -> int:
    """Run ``args.func(args)``; any exception becomes one error line and exit code 1
    (Ctrl-C: 130), with the traceback before it when debugging."""
    command = getattr(args, "command", None) or "?"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug_enabled(args):
            traceback.print_exc()
        print(f"mogu {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_enabled(args):
            traceback.print_exc()
        return fail(command, exc)


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-command's default must not hide ``mogu --debug CMD``.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=f"on an error, print the Python traceback too (default: off; also {DEBUG_ENV}=1)")


# ------------------------------------------------------------------ options
def add_model_args(p: argparse.ArgumentParser, mogu: Optional[str] = None, mogu_help: Optional[str] = None,
                   group: str = "model"):
    """--model, --gguf-file, [--mogu], --dtype, --device for the inference commands.

    mogu: None (no --mogu), "optional" or "required". Returns the argument group."""
    g = p.add_argument_group(group)
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--gguf-file", default=None, help=GGUF_HELP)
    if mogu is not None:
        required = mogu == "required"
        g.add_argument("--mogu", required=required,
                       help=(mogu_help or "MoGU folder: this project's format (folded or not) or a published "
                                          "release root; without it the plain base model runs")
                       + (" (required)" if required else " (default: none)"))
    g.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on CUDA) (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    return g


def add_batch_args(g) -> None:
    """--system, --batch-size, --no-progress for the commands that run prompt files."""
    g.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def add_eval_model_args(p: argparse.ArgumentParser, with_mogu: bool) -> None:
    """The model options of the commands that run a model over prompt files (build-data, eval,
    calibrate, probe): --model and friends, --mogu when ``with_mogu``, the batch options."""
    g = add_model_args(p, mogu="optional" if with_mogu else None,
                       mogu_help="MoGU folder (own format, folded or not, or a published release root); without it "
                                 "only the base model is evaluated")
    add_batch_args(g)


# ------------------------------------------------------------------ checks before the model loads
def clean_path(path):
    """``path`` without a trailing slash or ``./`` (so messages never show ``out//folded``)."""
    return os.path.normpath(os.fspath(path)) if path else path


def check_files(paths: Optional[Sequence], what: str) -> None:
    """Every path exists and is a file, else FileNotFoundError naming it."""
    for path in paths or []:
        path = clean_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"{what} must be a file, got the folder {path}")


def check_out(out: str, flag: str = "--out") -> str:
    """The output folder may not exist yet, but must not be a file nor inside the installed
    package (README commands used to write into ``mogu/``). Returns it cleaned."""
    out = clean_path(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{flag} {out} exists and is not a folder")
    real, package = os.path.realpath(out), os.path.realpath(PACKAGE_DIR)
    if real == package or real.startswith(package + os.sep):
        raise ValueError(f"{flag} {out} is inside the mogu package folder {package}; write outputs elsewhere, "
                         f"e.g. runs/...")
    return out


def check_out_files(out: str, owned: Sequence[str], overwrite: bool, resume: bool) -> str:
    """``check_out`` and, for the resumable commands (build-data, eval), the conflict with
    earlier outputs that the run would raise only after loading the model."""
    out = check_out(out)
    present = [f for f in owned if os.path.exists(os.path.join(out, f))] if os.path.isdir(out) else []
    if present and not (overwrite or resume):
        raise FileExistsError(f"{out} already holds {', '.join(present)}; drop --no-resume to continue the "
                              f"earlier run, or pass --overwrite to start again")
    return out


def check_positive(args, *names: str) -> None:
    """Numeric options that must be > 0 (None = not given), checked before the model loads."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_mogu_folder(path: str, own_only: bool = False, flag: str = "--mogu") -> str:
    """A MoGU folder holds the own format (mogu_config.json + mogu_model.safetensors) or,
    unless ``own_only``, a published release root. Returns it cleaned."""
    from ..checkpoint import OWN_CONFIG, OWN_WEIGHTS, latest_step_entry

    path = clean_path(path)
    if not os.path.exists(path):
        need = f"; it needs this project's format, {OWN_CONFIG} + {OWN_WEIGHTS}" if own_only else ""
        raise FileNotFoundError(f"MoGU folder not found: {path} ({flag}{need})")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} must be a MoGU folder, got the file {path}")
    config = os.path.join(path, OWN_CONFIG)
    if os.path.exists(config):
        if not os.path.exists(os.path.join(path, OWN_WEIGHTS)):
            raise FileNotFoundError(f"MoGU weights not found: {os.path.join(path, OWN_WEIGHTS)} ({flag})")
        return path
    if own_only:
        raise FileNotFoundError(f"MoGU folder config not found: {config} ({flag} needs this project's format)")
    parts = {d: os.path.join(path, d) for d in ("resp_glad", "resp_unwill", "router_layer")}
    missing = [p for p in parts.values() if not os.path.isdir(p)]
    if missing:
        raise FileNotFoundError(f"{path} ({flag}) holds neither {OWN_CONFIG} nor a published release (missing "
                                f"{', '.join(missing)})")
    for expert in ("glad", "unwill"):
        check_adapter_folder(latest_step_entry(parts[f"resp_{expert}"], "_lora"), expert, flag)
    latest_step_entry(parts["router_layer"], "_router.pth")
    return path


def check_adapter_folder(path: str, expert: str, flag: Optional[str] = None) -> str:
    """A peft adapter folder: adapter_config.json (valid JSON with r, lora_alpha) and
    adapter_model.safetensors or .bin. Returns it cleaned."""
    flag = flag or f"--{expert}"
    path = clean_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{expert} adapter folder not found: {path} ({flag})")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} must be a peft adapter folder, got the file {path}")
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{expert} adapter config not found: {config} ({flag})")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{expert} adapter weights not found: {os.path.join(path, 'adapter_model.safetensors')}"
                                f" (or adapter_model.bin) ({flag})")
    from ..checkpoint import read_adapter_config

    read_adapter_config(path, expert)       # the loader's own checks (JSON, r, lora_alpha, ...), naming the file
    return path


def check_model(args, command: Optional[str] = None) -> None:
    """Resolve ``args.model`` / ``args.gguf_file`` local first (``mogu.generation.resolve_model_path``):
    a missing folder, a wrong GGUF name or a hub name in offline mode fail here, before
    anything loads. A GGUF file found on its own is reported on stderr."""
    from ..generation import check_hub_model, resolve_model_path

    given = args.gguf_file
    args.model, args.gguf_file = resolve_model_path(args.model, args.gguf_file)
    check_hub_model(args.model, args.gguf_file)
    if given is None and args.gguf_file is not None and command:
        print(f"mogu {command}: using the GGUF file {os.path.join(args.model, args.gguf_file)}", file=sys.stderr)


def check_tokenizer(name: Optional[str]) -> Optional[str]:
    """--tokenizer: an existing folder, or a hub name (not in offline mode unless cached)."""
    from ..generation import is_hub_name, offline_var

    if name is None:
        return None
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"--tokenizer must be a tokenizer folder or hub name, got the file {name}")
        return clean_path(name)
    if not is_hub_name(name):
        raise FileNotFoundError(f"tokenizer folder not found: {clean_path(name)}")
    offline = offline_var()
    if offline is not None:
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = try_to_load_from_cache(name, "tokenizer_config.json")
        except Exception:
            cached = None
        if not isinstance(cached, str):
            raise FileNotFoundError(f"tokenizer folder not found: {name}; as a hub name it is not in the local "
                                    f"Hugging Face cache, and offline mode ({offline}=1) forbids downloading it")
    return name


# ------------------------------------------------------------------ loading
def load_inference_model(args, mogu_path=None, protocol: str = "exact"):
    """(model, tokenizer) for generation, after the checks (``mogu.generation.load_for_inference``)."""
    from ..generation import load_for_inference
    return load_for_inference(args.model, mogu_path=mogu_path, gguf_file=args.gguf_file, dtype=args.dtype,
                              device=args.device, protocol=protocol)


def load_training_model(args):
    """(model, tokenizer) for training: fp32, or bf16 with ``--bf16``; ``--tokenizer`` if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=args.trust_remote_code)
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    if args.tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                                 **kw)
    return model, tokenizer


def version_line() -> str:
    from importlib import metadata

    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    return f"mogu {v('mogu-kernels')} (torch {v('torch')}, transformers {v('transformers')}, Python " \
           f"{sys.version.split()[0]})"
