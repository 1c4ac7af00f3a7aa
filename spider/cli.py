"""The `spider` command line: run a job end to end, start the stack or one worker, manage jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from spider.errors import SpiderError
from spider.logs import LOG_FORMAT_ENV, LOG_FORMATS, log_format, use_json_logs
from spider.types import ENDING_KINDS, EventKind, JobStatus

DEFAULT_OUTPUT = "artifacts/{job_id}/result.{format}"


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SpiderError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _client(args: argparse.Namespace, config=None):
    from spider.client import SpiderClient

    return SpiderClient(config=config, base_url=args.url, api_key=args.api_key)


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class Progress:
    """A live progress line fed by job events: its phase (queued, loading model, generating, then how
    the job ended), rows done, generation tokens/s (model loading is not part of it) and the ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
            TextColumn("{task.fields[tps]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(JobStatus.QUEUED, total=None, tps="", unit="rows")
        self.loading = 0  # engines being loaded for the job right now
        self.generated = False  # whether a batch has completed

    def __enter__(self) -> "Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    @property
    def phase(self) -> str:
        return self.bar.tasks[0].description

    def _generating(self) -> str:
        return "loading model" if self.loading and not self.generated else "generating"

    def _training(self) -> str:
        return "loading model" if self.loading and not self.generated else "training"

    def __call__(self, event) -> None:
        data = event.data
        if event.kind == EventKind.JOB_PLANNED and "steps" in data:  # a training job counts steps
            self.bar.update(self.task, total=data["steps"], unit="steps", description=self._training())
        elif event.kind == EventKind.JOB_PLANNED:
            self.bar.update(self.task, total=data["rows_total"], description=self._generating())
        elif event.kind == EventKind.TRAIN_STEP:
            self.generated = True
            kl = data.get("teacher_kl")
            shown = f"KL {kl:.3f}" if kl is not None else ""
            if data.get("eval_teacher_kl") is not None:
                shown += f" (held-out {data['eval_teacher_kl']:.3f})"
            self.bar.update(self.task, completed=data["step"], total=data.get("steps_total"), tps=shown,
                            description=self._training())
            self.bar.console.print(
                f"step {data['step']}: teacher KL {_num(kl)}, loss {_num(data.get('loss'))}, "
                f"lr {_num(data.get('learning_rate'), '.2e')}, grad norm {_num(data.get('grad_norm'))}, "
                f"{data.get('tokens_trained')} tokens, aligned {_num(data.get('aligned_fraction'), '.1%')}, "
                f"{_num(data.get('step_s'), '.1f')}s"
            )
        elif event.kind == EventKind.TRAIN_EVAL:
            self.bar.console.print(f"{event.kind}: {event.message}")
        elif event.kind == EventKind.MODEL_LOADING:
            self.loading += 1
            self.bar.update(self.task, description=self._generating())
        elif event.kind == EventKind.MODEL_LOADED:
            self.loading = max(0, self.loading - 1)
            self.bar.update(self.task, description=self._generating())
            self.bar.console.print(f"{event.kind}: {event.message}")
        elif event.kind == EventKind.BATCH_COMPLETED:
            self.generated = True
            rate = data.get("tokens_per_second_total")
            tps = f"{rate:,.0f} tok/s" if rate else ""
            self.bar.update(
                self.task, completed=data["rows_done"], total=data.get("rows_total"), tps=tps,
                description=self._generating(),
            )
        elif event.level in ("warning", "error") or event.kind.startswith("job."):
            self.bar.console.print(f"{event.kind}: {event.message}")
            if event.kind in ENDING_KINDS:
                self.bar.update(self.task, description=event.kind.split(".")[1])


def cmd_run(args: argparse.Namespace) -> int:
    from spider.config import AppConfig
    from spider.local import Stopped, stop_signals_raise

    config = AppConfig.load(args.config, overrides=_overrides(args.set))
    try:
        # Installed before the local stack starts: whatever signal ends the command, every `with`
        # unwinds and the stack stops.
        with stop_signals_raise():
            return _run(args, config)
    except Stopped as stop:
        with contextlib.suppress(OSError):  # a closed terminal's SIGHUP leaves no stderr to write to
            print(f"stopped by {stop}", file=sys.stderr)
        return stop.exit_code


def _run(args: argparse.Namespace, config) -> int:
    import httpx

    from spider.client import SpiderClient
    from spider.local import Stopped

    env = list(args.env or [])
    if config.job.output.mode == "upload_hf" and config.job.output.hf is not None:
        env.append(config.job.output.hf.token_env)
    with SpiderClient(config=config, env=env, base_url=args.url, api_key=args.api_key) as client:
        if client.local_stack is not None:
            print(f"started the local stack at {client.base_url}", file=sys.stderr)
        job_id: str | None = None
        interrupted = False

        def on_interrupt(*_: Any) -> None:
            nonlocal interrupted
            if interrupted:
                raise KeyboardInterrupt
            interrupted = True
            print("\ncancelling the job (Ctrl-C again to leave now)", file=sys.stderr)
            if job_id is not None:
                client.cancel_job(job_id)

        # Installed before submitting, so no Ctrl-C can leave a job running unnoticed.
        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            job_id = client.submit_job()["job_id"]
            if interrupted:
                client.cancel_job(job_id)
            print(f"job {job_id} submitted", file=sys.stderr)
            with Progress() as progress:
                status = client.poll_job(job_id, on_event=progress)
        except Stopped:
            # A server's job would run on with no one to collect its result; a local stack's job
            # ends with the stack.
            if job_id is not None and client.local_stack is None:
                with contextlib.suppress(SpiderError, httpx.HTTPError):
                    client.cancel_job(job_id)
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
        partial = status["status"] == JobStatus.CANCELLED and not config.job.generation.on_policy
        if status["status"] != JobStatus.COMPLETED and not partial:
            print(f"job {job_id} {status['status']}: {status.get('error') or ''}", file=sys.stderr)
            return 1
        fmt = "tar.gz" if config.job.generation.on_policy else config.job.output.format
        destination = Path(args.output or DEFAULT_OUTPUT.format(job_id=job_id, format=fmt))
        client.download_result(job_id, destination)
        if partial:  # the rows done before the cancel are kept
            print(f"job {job_id} cancelled; wrote its partial result to {destination}", file=sys.stderr)
            print(str(destination))
            return 1
        print(f"wrote {destination}", file=sys.stderr)
        print(str(destination))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from spider.local import LocalStack, Stopped, scaled_workers, stop_signals_raise

    stack = LocalStack(
        port=args.port, quiet=False, data_dir=Path(args.data_dir) if args.data_dir else None, flower_port=args.flower_port,
        workers=scaled_workers(args.rollout_workers, tuple(args.model_worker or ())),
        env={LOG_FORMAT_ENV: log_format(args.log_format)},
    )
    # Ctrl-C, SIGTERM and SIGHUP all stop the stack, during its start too.
    try:
        with stop_signals_raise(), stack:
            print(f"Spider is up at {stack.url} (Redis {stack.redis_url}, data in {stack.data_dir}); Ctrl-C stops it",
                  flush=True)
            if args.flower_port:
                print(f"Flower: http://127.0.0.1:{args.flower_port} (FLOWER_BASIC_AUTH={stack.flower_auth})",
                      flush=True)
            stack.wait()  # until stopped, or a process of it keeps exiting (a SpiderError)
    except (KeyboardInterrupt, Stopped):
        pass
    return 0


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches this machine only: every address it resolves
    to is a loopback one. `0.0.0.0` and `::` (every interface) are not."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from spider.settings import Settings

    try:
        keys = Settings.from_env().api_keys
    except OSError as exc:
        raise SpiderError(f"cannot read the API keys (SPIDER_API_KEYS_FILE): {exc}") from None
    if not keys and not is_loopback(args.host):
        if not args.insecure_open:
            raise SpiderError(
                f"refusing to serve on {args.host} without API keys: with none configured, every caller "
                "acts as the same user and sees every job. Set SPIDER_API_KEYS (or SPIDER_API_KEYS_FILE), "
                "serve on a loopback address (the default, --host 127.0.0.1), or pass --insecure-open to "
                "serve openly on purpose"
            )
        print(f"warning: serving on {args.host} without API keys (--insecure-open): every caller is the same "
              "user", file=sys.stderr, flush=True)
    uvicorn_logs: dict = {}
    if log_format(args.log_format) == "json":
        use_json_logs("api")
        uvicorn_logs = {"log_config": None}  # uvicorn's loggers propagate to the JSON handler
    uvicorn.run("spider.api.app:app", host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=3,
                **uvicorn_logs)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    if args.unsafe_no_jail:
        os.environ["SPIDER_SANDBOX_UNSAFE"] = "1"
    from spider.settings import routed_models
    from spider.queues import worker_queues
    from spider.workers.app import celery_app

    asked = args.queues.split(",")
    models = args.models.split(",") if args.models else []
    queues = worker_queues(asked, models, routed_models())
    # Rollout tasks run on threads that share the process's engines through its engine loop: several
    # batches are in flight on one engine, which never drains between them. Training stays solo.
    pool = args.pool or ("solo" if "train" in queues else "threads")
    argv = ["worker", "-Q", ",".join(queues), "--pool", pool, "--loglevel", args.loglevel, "-E"]
    if pool != "solo":
        argv += ["--concurrency", str(args.concurrency)]
    hostname = args.hostname or default_hostname(asked, models)
    # Several workers on one machine each need a name of their own (Celery's default is one per host).
    argv += ["--hostname", hostname]
    if log_format(args.log_format) == "json":
        from celery.utils.nodenames import default_nodename, host_format

        from spider.workers.app import log_json

        log_json(host_format(default_nodename(hostname)))
        argv = ["--quiet", *argv]  # no banner: every line the worker writes is a JSON object
    # The worker's exit code, not 0 whatever happened (`worker_main` returns nothing): a worker that
    # stopped on an unrecoverable error exits non-zero, so that a restart policy starts it again.
    from celery import signals

    started = []
    signals.worker_init.connect(lambda sender, **_: started.append(sender), weak=False)
    celery_app.worker_main(argv)
    return (started[-1].exitcode if started else None) or 0


def default_hostname(queues: list[str], models: list[str]) -> str:
    """`<queues>[-<models>]-<pid>@<host>`: which worker it is, readable in Flower, and distinct for
    every worker process on the machine."""
    import os

    from spider.queues import worker_label

    return f"{worker_label(queues, models)}-{os.getpid()}@%h"


def cmd_flower(args: argparse.Namespace) -> int:
    """Flower (Celery's monitor) on Spider's Redis, always behind basic auth: it shows every task's
    arguments and can revoke tasks."""
    import logging
    import os
    import secrets

    json_logs = log_format(args.log_format) == "json"
    if json_logs:
        use_json_logs("flower")
    if not os.environ.get("FLOWER_BASIC_AUTH"):
        os.environ["FLOWER_BASIC_AUTH"] = f"admin:{secrets.token_urlsafe(18)}"
        login = (f"Flower's login (generated; set FLOWER_BASIC_AUTH=user:password to choose one): "
                 f"{os.environ['FLOWER_BASIC_AUTH']}")
        if json_logs:
            logging.getLogger("spider.flower").warning(login)
        else:
            print(login, file=sys.stderr, flush=True)
    from spider.workers.app import celery_app

    # The broker is SPIDER_REDIS_URL, through Spider's own Celery app: its password is on no command line.
    celery_app.start(["flower", f"--port={args.port}", f"--address={args.address}"])
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from spider.config import AppConfig

    config = AppConfig.load(args.config, overrides=_overrides(args.set))
    with _client(args, config) as client:
        print(json.dumps(client.submit_job()))
    return 0


def _server_client(args: argparse.Namespace):
    client = _client(args)
    if not client.base_url:
        raise SpiderError("no server given: pass --url or set SPIDER_URL")
    return client


def cmd_status(args: argparse.Namespace) -> int:
    with _server_client(args) as client:
        print(json.dumps(client.get_job_status(args.job_id) if args.job_id else client.list_jobs(), indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from spider.client.client import print_event

    with _server_client(args) as client:
        for event in client.stream_events(args.job_id, follow=args.follow):
            print_event(event)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _server_client(args) as client:
        print(json.dumps(client.cancel_job(args.job_id)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume a job; the secrets it was submitted with are sent again from this environment."""
    with _server_client(args) as client:
        names = client.get_job_status(args.job_id).get("secret_names") or []
        missing = [name for name in names if name not in os.environ]
        if missing:
            print(f"spider: resuming {args.job_id} needs its secrets again; set {', '.join(missing)} in the environment",
                  file=sys.stderr)
            return 2
        print(json.dumps(client.resume_job(args.job_id, {name: os.environ[name] for name in names})))
    return 0


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    with _server_client(args) as client:
        print(json.dumps(client.delete_job(args.job_id)))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _server_client(args) as client:
        print(client.download_result(args.job_id, args.output))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a training job's curves (teacher KL, loss, lr, grad norm, ...) to a PNG."""
    from spider.train.plot import plot_metrics

    with _server_client(args) as client:
        steps = client.training_metrics(args.job_id)
    output = Path(args.output or f"artifacts/{args.job_id}/metrics.png")
    if plot_metrics(steps, output) is None:
        print(f"job {args.job_id} has no training steps yet", file=sys.stderr)
        return 1
    print(str(output))
    return 0


def log_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help=f"text, or one JSON object per line (default: ${LOG_FORMAT_ENV}, else text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spider", description="Spider: distillation jobs from one config")
    sub = parser.add_subparsers(dest="command", required=True)

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="API base URL (default: server.base_url of the config, or $SPIDER_URL)")
        p.add_argument("--api-key", help="API key (default: server.api_key, or $SPIDER_API_KEY)")

    p = sub.add_parser("run", help="submit a config, show progress, download the result")
    p.add_argument("config")
    p.add_argument("-o", "--output", help=f"where to write the result (default {DEFAULT_OUTPUT})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--env", action="append", metavar="NAME", help="send this environment variable as a secret")
    server_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("up", help="run the local stack in the foreground: Redis, the API, one worker for each of "
                                  "control, rollout and sandbox")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--data-dir")
    p.add_argument("--flower-port", type=int, help="also run Flower (monitoring) on this port")
    p.add_argument("--rollout-workers", type=int, default=1, metavar="N",
                   help="rollout worker processes on the default rollout queue (default 1)")
    p.add_argument("--model-worker", action="append", metavar="MODEL",
                   help="one more rollout worker that serves only this model's jobs (repeatable; routes the model)")
    log_format_arg(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="run the API server only")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another address needs API keys)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--insecure-open", action="store_true",
                   help="serve on a non-loopback address without API keys (every caller is the same user)")
    log_format_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a worker for some queues")
    p.add_argument("--queues", "-Q", required=True, help="comma-separated: control, rollout, sandbox, train")
    p.add_argument("--models", metavar="NAME[,NAME...]",
                   help="rollout: serve only these models' jobs (each listed in SPIDER_ROUTED_MODELS) instead of "
                        "the default rollout queue")
    p.add_argument("--pool", choices=["solo", "threads", "prefork"], help="default: solo for train, else threads")
    p.add_argument("--concurrency", "-c", type=int, default=4)
    p.add_argument("--hostname", "-n", help="the worker's Celery name (default: its queues, models and pid @ host)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--unsafe-no-jail", action="store_true",
                   help="sandbox queue: run user code without firejail (warns on every job)")
    log_format_arg(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("flower", help="run Flower (monitoring of workers, queues and tasks) behind basic auth")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    log_format_arg(p)
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("submit", help="submit a config and print the job id")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    server_args(p)
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in (("status", cmd_status, "a job's status (or all your jobs)"),
                                 ("cancel", cmd_cancel, "cancel a job"),
                                 ("resume", cmd_resume, "resume a failed job where it stopped, or hand out "
                                                        "again what an active job lost")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job_id", nargs="?" if name == "status" else None)
        server_args(p)
        p.set_defaults(func=func)

    jobs = sub.add_parser("jobs", help="manage your jobs").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("delete", help="delete a job (cancelled first if it runs): its record, events and files")
    p.add_argument("job_id")
    server_args(p)
    p.set_defaults(func=cmd_jobs_delete)

    p = sub.add_parser("logs", help="a job's events")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job ends")
    server_args(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("download", help="download a job's result")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", required=True)
    server_args(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("plot", help="draw a training job's curves to a PNG")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", help="the PNG to write (default artifacts/<job>/metrics.png)")
    server_args(p)
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SpiderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
