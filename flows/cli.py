"""The `tinyseek` command line.

    tinyseek run [--preset tiny|demo|...] [--config FILE] [--set key.path=value ...] [--json]
    tinyseek data|pretrain|finetune|evaluate ...   one stage group, same options
    tinyseek serve | up                            Prefect deployments, local servers
    tinyseek generate|chat|next-token|export-hf    use a trained model
    tinyseek prune [--dry-run]                     remove what interrupted runs left

Every command takes `--workspace DIR` (else $TINYSEEK_WORKSPACE, else `data/`). Errors a
user can fix are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import select
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PRESET = "tiny"  # without --preset or a preset: in the --config file

QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
_held_slots: list = []



class UserError(Exception):
    """Shown as `error: <message>` with exit code 2."""


def prepare_environment(workspace_dir: str | None, *, read_only: bool = False) -> Path:
    """Quiet, offline defaults and a workspace-local Prefect home, set before Prefect loads.
    `read_only`: the command only reads models from the workspace and runs no flow."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from tasks.stage import workspace

    root = workspace(workspace_dir, writable=not read_only)
    os.environ["TINYSEEK_WORKSPACE"] = str(root)
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    if read_only:
        return root
    if not os.environ.get("PREFECT_API_URL") and "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ:
        database = ephemeral_database(Path(os.environ["PREFECT_HOME"]))
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
    return root


def ephemeral_database(home: Path) -> Path:
    """The SQLite file for this process's temporary Prefect server.

    Runs on one workspace share `prefect.db`; a run that starts while another holds it takes
    `prefect-1.db`, `prefect-2.db`, ... so two temporary servers never migrate or write one
    SQLite file at the same time. The slot is held (flock) for the life of the process.
    """
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    for slot in range(64):
        name = "prefect.db" if slot == 0 else f"prefect-{slot}.db"
        handle = open(home / f".{name}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_slots.append(handle)
        return home / name
    raise UserError(f"64 tinyseek runs already use {home}; wait for some to finish")


def check_servers(variables: tuple[str, ...] = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")) -> None:
    """Fail fast, in one line, when a configured Prefect or MLflow server does not answer
    (MLflow also takes a local store: a URI that is not http(s) is not probed)."""
    import httpx

    for variable in variables:
        url = os.environ.get(variable, "")
        if variable == "PREFECT_API_URL" and url and not url.startswith(("http://", "https://")):
            raise UserError(f"PREFECT_API_URL={url} is not an http(s) URL: give the server's API, "
                            "e.g. http://127.0.0.1:4200/api")
        if not url.startswith(("http://", "https://")):
            continue
        target = url.rstrip("/") + "/health"
        try:
            httpx.get(target, timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            raise UserError(f"{variable}={url} does not answer ({type(exc).__name__}); start the server or unset {variable}") from None


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="preset from configs/ (tiny, demo, gpu-small); default: the --config "
                        "file's preset:, else tiny")
    parser.add_argument("--config", help="YAML file with sections to override (collect:, model:, pretrain:, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one value, e.g. --set pretrain.steps=100 (repeatable)")


def add_workspace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", help="where outputs, checkpoints and the MLflow store live "
                        "(default: $TINYSEEK_WORKSPACE, else data/ in the project, whatever the current directory)")


def print_summary(result: dict[str, Any], as_json: bool) -> None:
    print()
    print(f"flow finished in {result['seconds']} s; workspace {result['workspace']}")
    for name, stage in result["stages"].items():
        flag = "reused" if stage["cached"] else "built "
        counts = ", ".join(f"{k}={v}" for k, v in list(stage["counts"].items())[:4])
        print(f"  {name:<9} {flag} {counts}")
    for key in ("metrics",):
        if result.get(key):
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result[key].items()))
    print(f"MLflow run {result['mlflow_run_id']} in {result['tracking_uri']}")
    version, reason, champion = result.get("version"), result.get("reason"), result.get("champion_before")
    if version and result.get("promoted"):
        print(f"registered model tinyseek version {version} ({result['model_uri']}), now the champion: {reason}")
    elif version and version != champion:
        stays = f"models:/tinyseek@champion stays version {champion}" if champion else "there is no champion yet"
        print(f"registered model tinyseek version {version} ({result['model_uri']}) as challenger only: {reason}; "
              f"{stays}")
    elif reason:
        print(reason)
    if result.get("report"):
        print(f"report: {result['report']}")
    if as_json:
        print(json.dumps(result, default=str))


def run_flow(name: str) -> Callable[[argparse.Namespace], None]:
    def command(args: argparse.Namespace) -> None:
        from tasks.config import load_config

        # first: a mistake leaves no trace
        config = load_config(args.preset, args.config, args.overrides, fallback=DEFAULT_PRESET)
        prepare_environment(args.workspace)
        check_servers()
        if not os.environ.get("PREFECT_API_URL"):
            from flows import temporary_server

            temporary_server.start(meanwhile=["flows.pipeline"])
        from flows import pipeline

        flow_fn = {"run": pipeline.build_llm, "data": pipeline.data_flow, "pretrain": pipeline.pretrain_flow,
                   "finetune": pipeline.finetune_flow, "evaluate": pipeline.evaluate_flow}[name]
        print_summary(flow_fn(config=config, workspace_dir=os.environ["TINYSEEK_WORKSPACE"]), args.json)

    return command


FLOW_HELP = {
    "run": "run the whole pipeline (build-llm): data, pretrain, finetune, evaluate, register",
    "data": "collect, clean and tokenize the corpus",
    "pretrain": "pretrain the model (reusing finished data stages)",
    "finetune": "fine-tune on labeled instructions (reusing finished stages)",
    "evaluate": "evaluate the base and fine-tuned models (reusing finished stages)",
}


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/tinyseek@champion",
                        help="models:/tinyseek@ALIAS, models:/tinyseek/VERSION, models:/m-<id> (a logged model), "
                        "runs:/RUN_ID/PATH, an MLflow run id (that `run`, `pretrain` or `finetune` printed), or a "
                        "model directory (default: models:/tinyseek@champion in the workspace's MLflow store)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, and refuse a value that is not `expected`
    (argparse then prints the usage and one error line)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return value

    return parse


COUNT = checked(int, lambda n: n >= 0, "a whole number >= 0")
POSITIVE = checked(int, lambda n: n >= 1, "a whole number >= 1")
PORT = checked(int, lambda n: 1 <= n <= 65535, "a port number from 1 to 65535")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=checked(float, lambda t: 0 <= t < math.inf, "a finite number >= 0"),
                        default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=checked(float, lambda p: 0 < p <= 1, "a number in (0, 1]"), default=1.0,
                        help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--top-k", type=COUNT, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=checked(int, lambda n: 0 <= n < 2**63, "a whole number from 0 to 2**63 - 1"),
                        help="seed for sampling")


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "fp8"], default="auto",
                        help="element type of the decode cache: auto (the model's), bf16 (half of fp32) or fp8 "
                        "(e4m3 without scales, a quarter); narrower caches round the cached keys "
                        "and values, so answers can change (default: auto)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: 2-3x faster per token on a CPU, after compiling "
                        "for ~15 s on first use (a few seconds once cached on disk); needs a C++ compiler")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    unused = [option for option, value in (("--top-k", args.top_k), ("--top-p", args.top_p < 1),
                                           ("--seed", args.seed is not None)) if value]
    if args.temperature == 0 and unused:
        verb = "applies" if len(unused) == 1 else "apply"
        print(f"note: {' and '.join(unused)} only {verb} when sampling (--temperature above 0); "
              f"decoding greedily", file=sys.stderr)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


def load_model(args: argparse.Namespace):
    root = prepare_environment(args.workspace, read_only=True)
    if not Path(args.model).is_dir():  # a registry reference: a dead server would be retried for minutes
        check_servers(("MLFLOW_TRACKING_URI",))
    from tasks import inference

    loaded = inference.load(args.model, root, device=args.device,
                            kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), compile=getattr(args, "compile", False))
    if loaded.compile:
        print("compiled decoding: the first reply waits for torch.compile (~15 s for the demo model; a few "
              "seconds once torch's disk cache holds it)", file=sys.stderr)
    return inference, loaded


def generate_command(args: argparse.Namespace) -> None:
    inference, loaded = load_model(args)
    print(inference.complete(loaded, args.prompt, chat=args.chat, **sampling(args)))


def chat_command(args: argparse.Namespace) -> None:
    if sys.stdin is None:
        raise UserError("chat reads your messages from standard input, which is closed: run it in a terminal "
                        "or pipe the messages in")
    if hasattr(sys.stdin, "reconfigure"):
        # a typed byte that is not UTF-8 reaches the chat as a lone surrogate (`tasks.chat.encode_text`),
        # as under the C locale, rather than ending it with a UnicodeDecodeError under a UTF-8 one
        sys.stdin.reconfigure(errors="surrogateescape")
    inference, loaded = load_model(args)
    inference.chat_loop(loaded, system=args.system, name=args.model, **sampling(args))


def next_token_command(args: argparse.Namespace) -> None:
    inference, loaded = load_model(args)
    print(inference.format_table(inference.next_token(loaded, args.prompt, top=args.top, chat=args.chat)))


def export_hf_command(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()  # as the shell would, for --out=~/hf
    if out.exists() and not out.is_dir():  # said before the model loads, as the next
        raise UserError(f"{out} is a file: --out names the folder to write the export into")
    from tasks.inference import EXPORT_STAGING, check_export_folder

    check_export_folder(out)  # a model's folder: not even with --force
    if not args.force and out.is_dir() and any(not p.name.startswith(EXPORT_STAGING) for p in out.iterdir()):
        raise UserError(f"{out} already holds files: choose another --out, or add --force to overwrite them")
    inference, loaded = load_model(args)
    out = inference.export_hf(loaded, out)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          "(transformers 5 or later)")


def prune_command(args: argparse.Namespace) -> None:
    from tasks.prune import prune
    from tasks.stage import workspace

    root = workspace(args.workspace, writable=False)
    if not root.is_dir():
        raise UserError(f"no workspace at {root}: nothing to prune")
    removed, running, failed = prune(root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if removed:
        total = sum(leftover.bytes for leftover in removed)
        print(f"{verb} {len(removed)} leftover(s) of interrupted runs in {root}, {total / 1e6:,.1f} MB:")
        for leftover in removed:
            print(f"  {leftover.path.relative_to(root)}  {leftover.what}, {leftover.bytes / 1e6:,.1f} MB")
    elif not failed:
        print(f"nothing to remove in {root}")
    for path in running:
        print(f"kept {path.relative_to(root)}: a run in progress holds it")
    if failed:
        listed = "; ".join(f"{failure.path.relative_to(root)}: {failure.reason}" for failure in failed)
        raise UserError(f"{len(failed)} leftover(s) or folder(s) could not be pruned: {listed}")


def serve_command(args: argparse.Namespace) -> None:
    from flows.deploy import check_cron, require_server, serve
    from tasks.config import load_config

    config = load_config(args.preset, args.config, args.overrides, fallback=DEFAULT_PRESET)
    require_server()  # before the workspace and its Prefect home are made
    root = prepare_environment(args.workspace)
    check_servers()
    check_cron(args.cron)  # loads Prefect: only once prepare_environment has set its home
    serve(config, str(root), args.cron)


def up_command(args: argparse.Namespace) -> None:
    from tasks.config import load_config

    load_config(args.preset, args.config, args.overrides, fallback=DEFAULT_PRESET)  # fails before any server starts
    root = prepare_environment(args.workspace)
    from flows.deploy import check_cron, up

    check_cron(args.cron)
    serve_args = ["--preset", args.preset] if args.preset else []
    serve_args += ["--workspace", str(root), "--cron", args.cron]
    serve_args += ["--config", args.config] if args.config else []
    for assignment in args.overrides:
        serve_args += ["--set", assignment]
    up(root, args.prefect_port, args.mlflow_port, args.host, serve_args)


DEBUG_HELP = "show tracebacks for errors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyseek",
        description="Build a small DeepSeek-V3-style language model from scratch: "
        "collect -> clean -> tokenize -> pretrain -> finetune -> evaluate -> register, "
        "orchestrated by Prefect and tracked in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in FLOW_HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        add_config_options(sub)
        sub.add_argument("--json", action="store_true", help="also print the summary as one JSON object, the "
                         "last line of standard output (logs go to standard error)")
        add_workspace(sub)
        sub.set_defaults(handler=run_flow(name), resumable=True)

    text = "serve all deployments (build-llm, each stage, retrain) to the Prefect server in PREFECT_API_URL"
    sub = commands.add_parser("serve", help=text, description=text)
    add_config_options(sub)
    sub.add_argument("--cron", default="0 3 * * *", help="retrain schedule, cron in UTC (default: daily at 03:00 UTC)")
    add_workspace(sub)
    sub.set_defaults(handler=serve_command)

    text = "start local Prefect and MLflow servers, serve the deployments, print the UI URLs; Ctrl-C stops all"
    sub = commands.add_parser("up", help=text, description=text)
    add_config_options(sub)
    sub.add_argument("--cron", default="0 3 * * *", help="retrain schedule, cron in UTC (default: daily at 03:00 UTC)")
    sub.add_argument("--host", default="127.0.0.1", help="address the servers listen on (default: 127.0.0.1)")
    sub.add_argument("--prefect-port", type=PORT, default=4200, help="Prefect server port (default: 4200)")
    sub.add_argument("--mlflow-port", type=PORT, default=5000, help="MLflow server port (default: 5000)")
    add_workspace(sub)
    sub.set_defaults(handler=up_command)

    text = "complete a prompt with a trained model"
    sub = commands.add_parser("generate", help=text, description=text)
    add_model_option(sub)
    sub.add_argument("--prompt", required=True, help="the text to complete (or the user message with --chat)")
    sub.add_argument("--chat", action="store_true", help="send the prompt as a chat message (fine-tuned models)")
    add_sampling_options(sub)
    add_decode_options(sub)
    add_workspace(sub)
    sub.set_defaults(handler=generate_command)

    text = "interactive chat that streams the model's replies"
    sub = commands.add_parser("chat", help=text, description=text)
    add_model_option(sub)
    sub.add_argument("--system", help="optional system message")
    add_sampling_options(sub)
    add_decode_options(sub)
    add_workspace(sub)
    sub.set_defaults(handler=chat_command)

    text = "the most probable next tokens and their probabilities"
    sub = commands.add_parser("next-token", help=text, description=text)
    add_model_option(sub)
    sub.add_argument("--prompt", required=True, help="the text whose next token to show")
    sub.add_argument("--top", type=POSITIVE, default=10, help="how many tokens to show (default: 10)")
    sub.add_argument("--chat", action="store_true", help="render the prompt as a chat message first")
    add_workspace(sub)
    sub.set_defaults(handler=next_token_command)

    text = ("remove what interrupted runs left in the workspace: checkpoints of training runs never finished "
            "(a run of the same config would have resumed them) and half-built outputs; finished outputs stay")
    sub = commands.add_parser("prune", help=text, description=text)
    sub.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    add_workspace(sub)
    sub.set_defaults(handler=prune_command)

    text = "write a directory that HF transformers (5 or later) loads"
    sub = commands.add_parser("export-hf", help=text, description=text)
    add_model_option(sub)
    sub.add_argument("--out", required=True, help="output directory (new or empty)")
    sub.add_argument("--force", action="store_true", help="write into --out even if it holds files, overwriting them")
    add_workspace(sub)
    sub.set_defaults(handler=export_hf_command)
    for sub in commands.choices.values():  # after the command too (`tinyseek run --debug`), not overriding one before it
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with standard output closed: what the command prints goes nowhere
        sys.stdout = open(os.devnull, "w")  # (and no file opened later takes its descriptor)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    from tasks.stage import user_errors

    try:
        args.handler(args)
        sys.stdout.flush()  # a reader gone shows here, not at exit
    except BrokenPipeError:
        if not stdout_gone():
            raise
        # the output was piped into a reader that stopped (`| head -1`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 141  # 128 + SIGPIPE, the status of a tool that signal ended
    except (UserError, *user_errors()) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not args.debug and (full := full_workspace_disk()):
            kept = "; finished stages are kept" if getattr(args, "resumable", False) else ""
            print(f"error: {full}: free some space and run again{kept}", file=sys.stderr)
            return 2
        if args.debug or not type(exc).__module__.startswith("mlflow"):
            raise
        where = os.environ.get("MLFLOW_TRACKING_URI") or "the workspace's MLflow store"
        from model.checkpoint import one_line

        detail = one_line(str(exc))
        hint = "; finished stages are kept, run again when it answers" if getattr(args, "resumable", False) else ""
        print(f"error: MLflow tracking at {where} failed ({detail}){hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up at exit short
        hint = ("; finished stages and training checkpoints are kept: the same command resumes"
                if getattr(args, "resumable", False) else "")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    return 0


# free bytes under which a failure is put down to the workspace's disk being full
FULL_DISK_BYTES = 16 << 20


def full_workspace_disk() -> str | None:
    """What to say when the disk holding the workspace is (nearly) full, else None. Every
    part of a run writes there (outputs, checkpoints, Prefect's and MLflow's SQLite stores),
    and each fails in its own way on a full disk, the last one Prefect's server answering 500."""
    root = os.environ.get("TINYSEEK_WORKSPACE")
    if not root:
        return None
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free >= FULL_DISK_BYTES:
        return None
    return f"the disk holding the workspace {root} is full ({free / 2**20:.1f} MiB free)"


def stdout_gone() -> bool:
    """Whether nothing reads standard output any more: a pipe or socket whose reader has
    closed reports an error condition when polled."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor (a replaced sys.stdout)
        return False


def print_stacks(signum: int, frame: Any) -> None:
    """Each thread's stack, most recent call last as in a traceback, to stderr (`kill -USR1`).

    Python runs this in the main thread between bytecodes, holding the GIL, so the other
    threads' frames stand still while they are read: faulthandler's dump reads them while
    they run, and a run crashed (SIGSEGV) in it. The price: a main thread inside one long
    C call (a training step) answers when the call returns. Written with one os.write, as
    a write through sys.stderr may be what the main thread was doing."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, top in sys._current_frames().items():
        top = frame if ident == threading.get_ident() else top  # where the signal found it, not here
        lines.append(f"Thread 0x{ident:x} ({names.get(ident, 'unnamed')}; most recent call last):")
        lines += [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in traceback.extract_stack(top)]
    os.write(2, ("\n".join(lines) + "\n").encode(errors="backslashreplace"))


def command_line() -> int:
    """The `tinyseek` command: `main`, then an exit without Python's last garbage collection.
    That collection walks every object torch, MLflow and Prefect made (~2 s after a run); at
    exit the OS frees them all at once. Files, runs and servers are closed before: by the
    commands themselves and by the exit hooks, which still run.

    `kill -USR1 PID` prints where each of its threads is, to its stderr, and the command
    goes on: how to see what a run that seems stuck is doing."""
    signal.signal(signal.SIGUSR1, print_stacks)
    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(command_line())
