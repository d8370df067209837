"""lm-evaluation-harness tasks on a saved model directory: `{task: {metric: value}}`.

The eval stage's `lm_eval: {tasks: [...], include_path: tasks/, limit: 100}` runs EleutherAI's harness
(Gao et al., "A framework for few-shot language model evaluation") on each model it evaluates, through the
harness's Python API: a task's prompts, requests and metrics are the harness's own, as in the papers that report it.

- `require_lm_eval`: the preflight check (cheap: the package is looked up, not imported).
- `run_lm_eval`: the tasks on one `model/` directory, a full model or LoRA adapters on the base they name.

lm-eval is an optional extra (`pip install -e ".[eval]"`); it is imported only inside `run_lm_eval`.
Nothing here reaches the network: the hub and datasets run offline while the harness runs, so a task whose data
is not local fails at once instead of downloading. Task YAMLs read local data with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`; lm-eval resolves a relative `data_files` against the working directory,
not the YAML's folder.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from align.errors import BadInput, closest

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[eval]"'
# Standard errors of metrics without a closed form (BLEU, F1, ...) come from bootstrap draws, in a pool of one
# process per CPU, per metric and task. 1000 draws estimate a standard error to about 2% (1 / sqrt(2 * draws));
# lm-eval's default, 100000, costs 100 times as much for the next digit. A mean's (acc) is closed-form either way.
BOOTSTRAP_ITERS = 1000


def require_lm_eval(where: str) -> None:
    """Fail at preflight, not after training, when the harness is missing.

    Looks the package up without importing it: importing the harness's evaluator and task registry takes seconds
    (1.7 s here), which a preflight check should not cost.

    Raises:
        BadInput: lm_eval cannot be imported, with the install command as the hint.
    """
    if find_spec("lm_eval") is None:
        raise BadInput(f"{where}: lm-evaluation-harness is not installed", hint=INSTALL_HINT)


def run_lm_eval(
    model_dir: Path | str,
    *,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the model saved in `model_dir` and return each task's metrics.

    Args:
        model_dir: a save_pretrained directory (config.json, weights, tokenizer), or LoRA adapters
            (adapter_config.json) whose base, named in their config, is loaded first (lm-eval's `peft=`). Weights
            load in the dtype they were saved in (lm-eval's `dtype="auto"`).
        tasks: task (or group, or tag) names: lm-eval's own, or the `task:` of a YAML under `include_path`.
        include_path: a folder of task YAMLs, searched besides lm-eval's own tasks.
        limit: at most this many documents per task (None: all).
        num_fewshot: examples in each prompt; None keeps each task's own setting (0 where it has none).
        batch_size: documents per forward pass.
        device: where the model runs ("cpu", "cuda", "cuda:1").
        seed: seeds Python, numpy and torch, and the choice of few-shot examples.

    Returns:
        `{task: {metric: value}}`, every value a float, for each task run (a group named in `tasks` gives its
        subtasks and, where it aggregates them, itself); `{}` on the other processes of a distributed launch.
        Metric names are lm-eval's without the default filter's suffix ("acc,none" -> "acc"); a task with
        several filters keeps them ("exact_match,strict-match"). Standard errors are kept, as "<metric>_stderr"
        ("acc_stderr"), where lm-eval computed one.

    Raises:
        BadInput: lm-eval is not installed, `include_path` is not a folder, a task name is unknown, the adapters
            name no base model (or one that is not there) or adapt a tied layer (lm-eval cannot load those: merge
            them), or a task's data is not here (a file that is missing, a hub data set not in the local cache).
    """
    require_lm_eval("lm_eval")
    model_dir = Path(model_dir).expanduser()
    if include_path is not None and not Path(include_path).is_dir():
        raise BadInput(f"lm_eval.include_path: {include_path} is not a folder")

    with offline(), quiet():
        import lm_eval

        # 1. The model: a full model as it is; LoRA adapters on the base they name, with their own tokenizer
        model_args = model_arguments(model_dir)

        # 2. Every task name known before the model loads
        task_manager = find_tasks(tasks, include_path)

        # 3. Run: the harness seeds Python, numpy and torch itself, and the few-shot sampler with the same seed
        try:
            output = lm_eval.simple_evaluate(
                model="hf",
                model_args=model_args,
                tasks=list(tasks),
                task_manager=task_manager,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                device=device,
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except ConnectionError as exc:  # datasets, offline, for data that is not in the local cache
            raise BadInput(
                f"lm_eval: {exc}",
                hint="lm_eval runs offline: load the task's data set once where the hub is reachable (it stays in the "
                "Hugging Face cache), or write the task over local files (dataset_path: json)",
            ) from exc
        except KeyError as exc:
            if "peft" not in model_args or "already exists" not in str(exc):
                raise
            # lm-eval ties the model's shared weights again after PEFT has loaded the adapters (transformers 5).
            raise BadInput(
                f"{model_dir}: lm-eval cannot evaluate these adapters: tying the base's shared weights again after "
                f"loading them failed ({exc}), as it does for adapters on a tied layer (an LM head that shares the "
                "embeddings' weights)",
                hint="save the stage with merge: true and evaluate the merged model",
            ) from exc
        except FileNotFoundError as exc:  # a task's data_files
            raise BadInput(
                f"lm_eval: {exc}",
                hint=f"lm-eval reads a task's relative data_files from the working directory ({Path.cwd()}), "
                "not from the YAML's folder",
            ) from exc

    if output is None:  # under a distributed launch, rank 0 alone gathers the results
        return {}
    # 4. Plain floats, one log line per task
    scores = {task: plain_metrics(metrics) for task, metrics in output["results"].items()}
    for task, metrics in scores.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if not name.endswith("_stderr"))
        logger.info("lm_eval %s on %s: %s", task, model_dir, shown or "no metrics")
    return scores


def model_arguments(model_dir: Path) -> dict[str, Any]:
    """lm-eval's `model_args` for its "hf" model: `pretrained=` the directory, or for LoRA adapters the base they
    name with `peft=` the adapters and `tokenizer=` their folder (align saves the tokenizer beside them). Checked
    first with align's own `hub_config`, so a model that cannot load fails with the message every stage gives.
    Call it offline: a base that is a hub id is looked for in the local cache only.

    Raises:
        BadInput: no model in the directory, adapters that name no base model, or a base that is not here.
    """
    from align.models import adapter_base, hub_config, is_adapter_dir

    adapters = is_adapter_dir(str(model_dir))
    if not adapters and not (model_dir / "config.json").is_file():
        raise BadInput(f"{model_dir}: no model here (no config.json or adapter_config.json)")
    hub_config(str(model_dir), str(model_dir))
    if adapters:
        return {"pretrained": adapter_base(str(model_dir)), "peft": str(model_dir), "tokenizer": str(model_dir)}
    return {"pretrained": str(model_dir)}


def find_tasks(tasks: list[str], include_path: Path | None) -> Any:
    """An lm-eval TaskManager that knows every name in `tasks`.

    lm-eval's own 14,000 task YAMLs take 14 s to index (measured on 2 CPU cores), so tasks that are all plain tasks of
    `include_path` are found there alone; otherwise (a built-in task, a group or a tag) lm-eval's own are indexed
    too, once per process and `include_path` (an eval stage evaluates several models with the same tasks).

    Raises:
        BadInput: a name is neither in `include_path` nor among lm-eval's own tasks.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_subtasks for name in tasks):
            return local
    manager = _with_builtin_tasks(str(include_path) if include_path is not None else None)
    check_task_names(tasks, manager.all_tasks, include_path)
    return manager


@functools.cache
def _with_builtin_tasks(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_task_names(tasks: list[str], known: list[str], include_path: Path | None) -> None:
    """Raises:
    BadInput: one problem per unknown task name, naming where it was looked for, with the closest known name.
    """
    where = f"{include_path} or lm-eval's own tasks" if include_path is not None else "lm-eval's own tasks"
    problems = []
    for name in tasks:
        if name not in known:
            suggestion = closest(name, known)
            tail = f" (did you mean '{suggestion}'?)" if suggestion else ""
            problems.append(f"lm_eval.tasks: no task '{name}' in {where}{tail}")
    if problems:
        raise BadInput(problems, hint="a task's name is the `task:` key of its YAML")


def plain_metrics(results: dict[str, Any]) -> dict[str, float]:
    """One task's entry of lm-eval's `results`, as `{metric: float}`.

    lm-eval keys a metric by "name,filter" ("acc,none", "exact_match,strict-match"); the default filter ("none")
    is dropped from the name. Entries that are not numbers are left out: the task's display name ("alias") and
    the "N/A" lm-eval gives a standard error it could not compute.
    """
    metrics = {}
    for key, value in results.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metrics[name if filter_name == "none" else key] = float(value)
    return metrics


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub and datasets offline while the harness runs, restored after as they were.

    huggingface_hub and datasets read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import, into module
    constants; where they are already imported the constants are switched too (as align.patches.set_hub_offline
    does, but restored here after).
    """
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    switches = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    saved_env = {name: os.environ.get(name) for name in switches}
    saved_constants = [
        (module, name, getattr(module, name))
        for module, name in ((hub_constants, "HF_HUB_OFFLINE"), (ds_config, "HF_HUB_OFFLINE"),
                             (ds_config, "HF_DATASETS_OFFLINE"))
        if hasattr(module, name)
    ]  # fmt: skip
    os.environ.update(switches)
    for module, name, _ in saved_constants:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_constants:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's console output cut to what a user reads, restored after as it was.

    - Its log records at the level align gives the other libraries (one notch quieter than align's own), unless
      someone set lm_eval's level on purpose.
    - What it prints (batch-size detection, bootstrap notices) goes to the log at debug.
    - Progress bars (lm-eval's, and the loading bars of transformers and datasets it sets off) follow align's
      policy (align/runtime.py): kept at a terminal, where an hour-long task shows it is alive; elsewhere (logs,
      CI) they are noise. lm-eval passes `disable=` to tqdm itself, so TQDM_DISABLE cannot stop its bars: off a
      terminal, its stderr is captured (align's log handlers hold the real stream and still write there).
    """
    import datasets
    from transformers.utils import logging as hf_logging

    lm_eval_logger = logging.getLogger("lm_eval")
    saved_level = lm_eval_logger.level
    if saved_level == logging.NOTSET:
        lm_eval_logger.setLevel(max(logging.getLogger("transformers").getEffectiveLevel(), logging.INFO))
    from align.runtime import draws_progress_bars

    bars = draws_progress_bars()  # progress bars shown: at a terminal only
    bars_were = (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    if not bars:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    printed, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors if not bars else sys.stderr):
            yield
    finally:
        if bars_were[0]:
            hf_logging.enable_progress_bar()
        if bars_were[1]:
            datasets.enable_progress_bars()
        lm_eval_logger.setLevel(saved_level)
        # tqdm redraws a bar with carriage returns; "%|" is in every bar it draws.
        lines = re.split(r"[\r\n]+", printed.getvalue() + errors.getvalue())
        kept = [line for line in lines if line.strip() and "%|" not in line]
        if kept:
            logger.debug("lm-eval printed:\n%s", "\n".join(kept))
