"""Experiment tracking: one interface, one backend per tracker behind it (wandb, trackio, MLflow, TensorBoard).

Each backend opens one run per stage, named `<recipe>/<stage>`, grouped by the pipeline run (`<recipe>-<time>-<id>`):
wandb's group, trackio's group, an MLflow parent run, a TensorBoard folder. Every backend records the same metric
names, those the Trainer's WandbCallback writes (`train/loss`, `train/grad_norm`, `train/learning_rate`,
`eval/loss`, ..., `train/global_step`) plus align's own (`train/tokens_per_s`, `memory/...`), at the Trainer's
global step; summary values keep the names of `summary.json`'s metrics.

Why wandb is fed by the Trainer's own callback and the others by align (transformers has a callback for each; what
they log was checked against transformers 5.2x):
- `TrackioCallback` calls `trackio.init` itself, without a group, and on resuming a run replaces its config; it
  finishes the run when training ends, before align's final evaluation and summary; it can sync to a Hub Space.
- `MLflowCallback` logs the Trainer's raw names (`loss`, `eval_loss`), not wandb's (`train/loss`, `eval/loss`).
- `TensorBoardCallback` names metrics as wandb does, but picks its folder from an environment variable or under
  the checkpoints folder, and draws the final re-measurement of the restored model as a new point of the curve.
So the Trainer reports to wandb alone (`report_to`), and `MetricsWriter` hands every row the Trainer logs to
`Tracker.log_trainer`, which renames it with transformers' own `rewrite_logs` (the WandbCallback's renaming) for the
backends that are not wandb. Stages never branch on tracking: they call the `Tracker`, which does nothing for the
trackers that are off, and nothing at all off the main process.

Tracking trouble never stops training: a backend that fails says so once, in a warning, and is off for the rest of
the stage.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import BadInput
from align.runtime import is_main_process, reachable

if TYPE_CHECKING:
    from align.recipe import MlflowSettings, Stage, TensorBoardSettings, Tracking, TrackioSettings, WandbSettings

logger = logging.getLogger(__name__)

# What each tracker needs installed: (the module it imports, the extra that installs it).
REQUIREMENTS = {
    "wandb": ("wandb", None),  # a core dependency
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
    "tensorboard": ("tensorboard", "tensorboard"),
}
# The Trainer's closing averages, which the WandbCallback keeps out of the curves and puts in the run's summary.
SINGLE_VALUE_SCALARS = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "total_flos",
)


def enabled(tracking: Tracking) -> list[str]:
    """The trackers a recipe turns on, in a fixed order."""
    names = ["wandb"] if tracking.wandb.mode != "disabled" else []
    return names + [name for name in ("trackio", "mlflow", "tensorboard") if getattr(tracking, name) is not None]


def check_installed(tracking: Tracking) -> None:
    """Every tracker the recipe turns on is installed; run at preflight, before anything is written.

    Raises:
        BadInput: one problem per missing tracker, with the extra that installs it.
    """
    missing = [name for name in enabled(tracking) if find_spec(REQUIREMENTS[name][0]) is None]
    if missing:
        extras = ",".join(REQUIREMENTS[name][1] or name for name in missing)
        raise BadInput(
            [f"tracking.{name}: {REQUIREMENTS[name][0]} is not installed" for name in missing],
            hint=f'pip install -e ".[{extras}]" (or remove the tracker from tracking:)',
        )


def report_to(settings: WandbSettings) -> list[str]:
    """The Trainer's `report_to`: wandb on the main process unless tracking is disabled (the mode's online/offline
    choice never turns it off), nothing elsewhere. Known before the tracker exists, so the plan can hold it. The
    other trackers are fed by align (`Tracker.log_trainer`), not by the Trainer's callbacks."""
    return ["wandb"] if settings.mode != "disabled" and is_main_process() else []


class Tracker:
    """The one tracking interface of a pipeline run: each call goes to every tracker the recipe turns on."""

    def __init__(self, settings: Tracking, recipe_name: str, group: str, run_dir: Path):
        self.settings = settings
        self.recipe_name = recipe_name
        self.group = group
        self.run_dir = run_dir
        self.step = 0  # the Trainer's global step of the last row: align's own values are logged at it
        self.backends: list[Backend] = []
        if is_main_process():
            common = {"recipe_name": recipe_name, "group": group, "run_dir": run_dir}
            if settings.wandb.mode != "disabled":
                self.backends.append(WandbBackend(settings.wandb, **common))
            if settings.trackio is not None:
                self.backends.append(TrackioBackend(settings.trackio, **common))
            if settings.mlflow is not None:
                self.backends.append(MlflowBackend(settings.mlflow, **common))
            if settings.tensorboard is not None:
                self.backends.append(TensorBoardBackend(settings.tensorboard, **common))
        self._active: list[Backend] = []

    @property
    def report_to(self) -> list[str]:
        return report_to(self.settings.wandb)

    def start_stage(self, stage: Stage, config: dict[str, Any]) -> None:
        """Open this stage's run in every tracker, with the stage's resolved (redacted) recipe as its config."""
        self.step = 0
        self._active = list(self.backends)
        self._each("start", f"{self.recipe_name}/{stage.name}", stage, config)

    def log(self, values: dict[str, Any]) -> None:
        """align's own values (`train/tokens_per_s`, `memory/...`), at their `train/global_step` or the last one."""
        self.step = int(values.get("train/global_step", self.step))
        self._each("log", values, self.step)

    def log_trainer(self, logs: dict[str, Any], step: int) -> None:
        """A row as the Trainer logged it (`loss`, `eval_loss`, ...), for the trackers the Trainer does not feed,
        named as the WandbCallback names it (`train/loss`, `eval/loss`, plus `train/global_step`)."""
        self.step = int(step)
        backends = [b for b in self._active if not b.fed_by_trainer]
        if not backends:
            return
        from transformers.integrations import rewrite_logs

        closing = {k: v for k, v in logs.items() if k in SINGLE_VALUE_SCALARS}
        curves = rewrite_logs({k: v for k, v in logs.items() if k not in SINGLE_VALUE_SCALARS})
        self._each("log", curves | {"train/global_step": self.step}, self.step, backends=backends)
        if closing:
            self._each("summary", closing, self.step, backends=backends)

    def summary(self, values: dict[str, Any]) -> None:
        """The stage's closing numbers, under `summary.json`'s names; None values are left out."""
        self._each("summary", {k: v for k, v in values.items() if v is not None}, self.step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._each("table", key, columns, rows, self.step)

    def alert(self, title: str, text: str) -> None:
        self._each("alert", title, text, self.step)

    def finish_stage(self, exit_code: int = 0) -> None:
        self._each("finish", exit_code)
        self._active = []

    def _each(self, method: str, *args: Any, backends: list[Backend] | None = None) -> None:
        for backend in [b for b in (self._active if backends is None else backends) if b in self._active]:
            try:
                getattr(backend, method)(*args)
            except Exception as exc:
                logger.warning("%s: %s failed (%s: %s); no more %s records this stage",
                               backend.name, method, type(exc).__name__, exc, backend.name)  # fmt: skip
                logger.debug("%s failure", backend.name, exc_info=True)
                self._active.remove(backend)


class Backend:
    """One tracker. `start` opens the stage's run; every other call writes into it; `finish` closes it."""

    name = "tracker"
    fed_by_trainer = False  # True when the Trainer's own callback logs its rows (report_to)

    def __init__(self, settings: Any, recipe_name: str, group: str, run_dir: Path):
        self.settings = settings
        self.recipe_name = recipe_name
        self.group = group
        self.run_dir = run_dir

    def start(self, run_name: str, stage: Stage, config: dict[str, Any]) -> None: ...

    def log(self, values: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any], step: int) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...

    def alert(self, title: str, text: str, step: int) -> None: ...

    def finish(self, exit_code: int) -> None: ...


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The values a metric store takes: finite-or-not floats (booleans as 0/1); strings and None are left out."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, str)}


# --------------------------------------------------------------------------------------------------
# wandb


class WandbBackend(Backend):
    """wandb: the Trainer's WandbCallback logs into the run align opened; align adds its own keys and the summary."""

    name = "wandb"
    fed_by_trainer = True

    def __init__(self, settings: WandbSettings, recipe_name: str, group: str, run_dir: Path):
        super().__init__(settings, recipe_name, group, run_dir)
        self.mode = self._effective_mode(settings.mode)
        self.run: Any = None

    def _effective_mode(self, mode: str) -> str:
        if mode != "online":
            return mode
        if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            return os.environ["WANDB_MODE"]  # the environment may keep an online recipe off the network
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if has_key and reachable(base):
            return "online"
        why = "no wandb credentials (WANDB_API_KEY or `wandb login`)" if not has_key else f"{base} is not reachable"
        logger.warning(
            "wandb: %s; logging offline under %s — sync later with `wandb sync %s/wandb/offline-run-*`",
            why,
            self.run_dir / "wandb",
            self.run_dir,
        )
        return "offline"

    def start(self, run_name: str, stage: Stage, config: dict[str, Any]) -> None:
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Silent from setup on, not only for this run: otherwise every checkpoint save prints "URL not available in
        # offline run" (TRL's model card asks for the run's URL). What matters, align logs itself.
        wandb.setup(settings=wandb.Settings(silent=True))
        self.run = wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            name=run_name,
            group=self.group,
            job_type=stage.kind,
            tags=self.settings.tags or None,
            config=config,
            dir=str(self.run_dir),
            mode=self.mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        where = self.run.url if self.mode == "online" else self.run.dir
        logger.info("wandb %s run %s: %s", self.mode, self.run.name, where)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(values)

    def summary(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def alert(self, title: str, text: str, step: int) -> None:
        if self.run is not None and self.mode == "online":
            self.run.alert(title=title, text=text)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


# --------------------------------------------------------------------------------------------------
# trackio

# The trackio folder align pointed TRACKIO_DIR at, to tell its own setting from the user's.
_trackio_dir_set_by_align: str | None = None


@contextlib.contextmanager
def _quiet_stdout(what: str):
    """trackio prints its progress on stdout, which holds align's results table: into the log (DEBUG) instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    text = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue()).strip()
    if text:
        logger.debug("trackio %s: %s", what, text.replace("\n", " | "))


class TrackioBackend(Backend):
    """trackio: a local SQLite database per project, `<run dir>/trackio/<project>.db` (TRACKIO_DIR, unless set)."""

    name = "trackio"

    def __init__(self, settings: TrackioSettings, recipe_name: str, group: str, run_dir: Path):
        super().__init__(settings, recipe_name, group, run_dir)
        self.run: Any = None
        user_dir = os.environ.get("TRACKIO_DIR")
        self.user_set = bool(user_dir) and user_dir != _trackio_dir_set_by_align
        self.folder = Path(user_dir) if self.user_set else (run_dir / "trackio").resolve()

    @property
    def database(self) -> Path:
        return self.folder / f"{self.settings.project}.db"

    def start(self, run_name: str, stage: Stage, config: dict[str, Any]) -> None:
        global _trackio_dir_set_by_align

        if not self.user_set:
            # trackio reads TRACKIO_DIR once, when first imported: set it before.
            os.environ["TRACKIO_DIR"] = _trackio_dir_set_by_align = str(self.folder)
        import trackio
        import trackio.utils

        actual = Path(trackio.utils.TRACKIO_DIR)
        if actual.resolve() != self.folder.resolve():
            logger.warning("trackio was imported earlier in this process and keeps its database folder %s: this "
                           "run's trackio runs go there, not to %s", actual, self.folder)  # fmt: skip
            self.folder = actual
        with _quiet_stdout("init"):
            self.run = trackio.init(
                project=self.settings.project,
                name=run_name,
                group=self.group,
                config=config,
                resume="never",
                embed=False,
                # align logs its own memory and throughput; trackio's samplers would add threads and other names.
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        logger.info("trackio run %s: %s (`trackio show --project %s`, with TRACKIO_DIR=%s)",
                    run_name, self.database, self.settings.project, self.folder)  # fmt: skip

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(numbers(values), step=step)

    def summary(self, values: dict[str, Any], step: int) -> None:
        # trackio has no run summary: the closing numbers are one more row, at the last step.
        self.log(values, step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            import trackio

            self.run.log({key: trackio.Table(columns=columns, data=rows)}, step=step)

    def alert(self, title: str, text: str, step: int) -> None:
        if self.run is not None:
            with _quiet_stdout("alert"):
                self.run.alert(title=title, text=text)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            import trackio

            with _quiet_stdout("finish"):
                trackio.finish()
            self.run = None


# --------------------------------------------------------------------------------------------------
# MLflow


class MlflowBackend(Backend):
    """MLflow through its client (no global state): a parent run per pipeline run, a child run per stage, in a
    file store at `<run dir>/mlruns` unless `tracking_uri` names another."""

    name = "mlflow"

    def __init__(self, settings: MlflowSettings, recipe_name: str, group: str, run_dir: Path):
        super().__init__(settings, recipe_name, group, run_dir)
        self.uri = settings.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        self.client: Any = None
        self.parent: str | None = None
        self.run: str | None = None
        self.alerts = 0

    def start(self, run_name: str, stage: Stage, config: dict[str, Any]) -> None:
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3 keeps its file store only behind this switch ("maintenance mode"); a file store is what
            # stays readable without a server or a database driver.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.settings.experiment)
        tags = {"align.pipeline_run": self.group, "align.recipe": self.recipe_name}
        if self.parent is None:
            self.parent = client.create_run(experiment_id, run_name=self.group, tags=tags).info.run_id
        else:
            client.update_run(self.parent, status="RUNNING")
        tags |= {"mlflow.parentRunId": self.parent, "align.stage": stage.name, "align.kind": stage.kind}
        self.run = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, str(v)) for k, v in _flatten(config).items() if len(str(v)) <= 500]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            client.log_batch(self.run, params=params[i : i + 100])
        client.log_dict(self.run, config, "config.json")  # the whole config, nested, long values included
        logger.info("mlflow run %s: %s (experiment %s)", run_name, self.uri, self.settings.experiment)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(_MLFLOW_UNSAFE.sub("_", k), v, now, step) for k, v in numbers(values).items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run, metrics=metrics[i : i + 1000])

    def summary(self, values: dict[str, Any], step: int) -> None:
        self.log(values, step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pandas' dtype deprecations from inside log_table
                self.client.log_table(self.run, data=data, artifact_file=f"{key}.json")

    def alert(self, title: str, text: str, step: int) -> None:
        if self.run is not None:
            self.alerts += 1
            self.client.set_tag(self.run, f"align.alert.{self.alerts}", f"{title} (step {step}): {text}"[:5000])

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            status = "FINISHED" if exit_code == 0 else "FAILED"
            self.client.set_terminated(self.run, status)
            # The parent ends with each stage, so that it never stays RUNNING after the pipeline; the next stage
            # reopens it.
            self.client.set_terminated(self.parent, status)
            self.run = None


# Characters MLflow refuses in a metric name (its Trainer callback replaces them the same way).
_MLFLOW_UNSAFE = re.compile(r"[^0-9A-Za-z_\-\.\ :/]")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


# --------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardBackend(Backend):
    """TensorBoard event files, one folder per stage: `<run dir>/tensorboard/<pipeline run>/<stage>`."""

    name = "tensorboard"

    def __init__(self, settings: TensorBoardSettings, recipe_name: str, group: str, run_dir: Path):
        super().__init__(settings, recipe_name, group, run_dir)
        self.writer: Any = None

    def start(self, run_name: str, stage: Stage, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / "tensorboard" / self.group / stage.name
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=30)
        self.writer.add_text("run", f"{run_name} ({stage.kind}), pipeline run {self.group}")
        self.writer.add_text("config", _code(json.dumps(config, indent=2, default=str)))
        logger.info("tensorboard run %s: %s", run_name, folder)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for key, value in numbers(values).items():
                self.writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, Any], step: int) -> None:
        self.log(values, step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.writer is not None:
            cell = lambda value: str(value).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            self.writer.add_text(key, "\n".join(lines), step)

    def alert(self, title: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text("alerts", f"**{title}**: {text}", step)

    def finish(self, exit_code: int) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _code(text: str) -> str:
    """Markdown code (TensorBoard renders text as Markdown): four spaces before every line."""
    return "\n".join("    " + line for line in text.splitlines())
