"""The `align` command, `align chat`, model cards and `align push`, on one tiny lm -> sft run made by `align run`."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_lm_recipe, write_yaml

SFT = {
    "name": "sft",
    "kind": "sft",
    "data": {"card": "python-docs-instruct", "max_train_rows": 32, "max_eval_rows": 16},
    "train": {"max_length": 64, "max_steps": 2, "per_device_train_batch_size": 8},
    "generations": 0,
}
# Heavy modules that no `--help` may import: they take seconds to load.
HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "huggingface_hub", "wandb", "pydantic")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One lm -> sft run made with `align run` (~15 s on 2 idle cores), which every test below reads."""
    from align.cli import main

    tmp = tmp_path_factory.mktemp("cli")
    recipe = tiny_lm_recipe()
    recipe["stages"][0]["train"]["max_steps"] = 10
    recipe["stages"].append(SFT)
    assert main(["run", str(write_yaml(tmp / "r.yaml", recipe)), "--output-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time: what "nothing on disk changed" compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------------------
# 1. The `align` command


HELP_PROBE = """
import contextlib, io, json, sys, time
from align.cli import main
results = {}
for args in (["--help"], ["run", "--help"], ["report", "--help"], ["chat", "--help"], ["push", "--help"]):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
    results[" ".join(args)] = {"code": code, "s": time.perf_counter() - start, "text": out.getvalue()}
print(json.dumps({"results": results, "modules": sorted(sys.modules)}))
"""


def test_help_lists_the_commands_and_imports_nothing_heavy():
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, cwd=REPO, timeout=60)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    print(f"python start + 5 helps: {took:.2f} s;", {k: round(v["s"], 3) for k, v in probe["results"].items()})
    heavy = [m for m in probe["modules"] if m.split(".")[0] in HEAVY]
    assert not heavy, f"--help imported {sorted({m.split('.')[0] for m in heavy})}"
    results = probe["results"]
    assert all(r["code"] == 0 for r in results.values()), results
    for command in ("run", "report", "chat", "push"):
        assert f"\n    {command} " in results["--help"]["text"]
    run_help = results["run --help"]["text"]
    assert run_help.startswith("usage: align run ") and "--print-config" in run_help
    assert "python -m align.run" not in run_help
    for flag in ("--stage", "--temperature", "--top-p", "--max-new-tokens", "--seed", "--prompt", "--compare"):
        assert flag in results["chat --help"]["text"]
    assert "--repo-id" in results["push --help"]["text"] and "--private" in results["push --help"]["text"]


def test_the_console_command_is_installed_and_the_python_m_forms_still_work():
    align = Path(sys.executable).parent / "align"
    assert align.is_file(), "pip install -e . installs the `align` console command next to python"
    for command in ([str(align), "--help"], [sys.executable, "-m", "align.run", "--help"],
                    [sys.executable, "-m", "align.report", "--help"]):  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
        print(f"{' '.join(command[-3:])}: {time.perf_counter() - started:.2f} s")
        assert done.returncode == 0, done.stderr
    code = subprocess.run([str(align), "chta"], capture_output=True, text=True, timeout=60)
    assert code.returncode == 2 and errors(code.stderr) == ["error: unknown command 'chta' (did you mean 'chat'?)"]


def test_align_imports_from_the_folder_that_holds_a_clone_named_align(tmp_path):
    """From `~` with the clone in `~/align`, Python's path search meets the clone (no __init__.py) before any import
    hook: the install must put a regular package on the path (pyproject.toml's package-dir), or `align` is that
    folder as a namespace package and the README's Python example fails with an ImportError."""
    (tmp_path / "align" / "recipes").mkdir(parents=True)
    (tmp_path / "align" / "README.md").write_text("a clone\n")
    code = "import align, align.loader; print(align.__version__, align.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == str(REPO / "align" / "__init__.py")


@pytest.mark.slow
def test_align_run_made_the_run_and_align_report_rebuilds_its_report(run_dir, capsys):
    from align.cli import main

    assert json.loads((run_dir / "pipeline.json").read_text())["stages"][1]["status"] == "completed"
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html") and (run_dir / "report.html").is_file()


# --------------------------------------------------------------------------------------------------
# 2. align chat


@pytest.mark.slow
def test_each_model_records_how_its_prompts_were_formatted(run_dir):
    lm = json.loads((run_dir / "lm" / "model" / "align_prompts.json").read_text())
    sft = json.loads((run_dir / "sft" / "model" / "align_prompts.json").read_text())
    assert (lm["format"], lm["data_format"], lm["stage"]) == ("plain", "text", "lm")
    # The builtin instruction prompts are strings ending in a blank line; the tokenizer's `### user:` template was
    # saved with the model but never used in training.
    assert (sft["format"], sft["data_format"], sft["prompt_suffix"]) == ("plain", "prompt_completion", "\n\n")
    assert sft["example_prompt"].startswith("Continue this passage from the Python documentation")
    assert "'### ' + message['role']" in (run_dir / "sft" / "model" / "chat_template.jinja").read_text()


def test_prompt_format_follows_the_data():
    from align.prompt_format import prompt_format_of

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert prompt_format_of("sft", "messages", [{"messages": messages}]).format == "chat_template"
    rows = [{"prompt": messages[:1], "chosen": messages[1:], "rejected": messages[1:]}]
    assert prompt_format_of("dpo", "preference", rows).format == "chat_template"
    implicit = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"}]
    found = prompt_format_of("dpo", "preference_implicit", implicit)
    assert (found.format, found.prompt_suffix) == ("plain", "")
    assert prompt_format_of("sft", "text", [{"text": "x"}]).format == "plain"


@pytest.mark.slow
def test_conversation_is_rendered_as_the_model_was_trained(run_dir):
    from align.chat import Conversation
    from align.models import load_tokenizer
    from align.prompt_format import PromptFormat, read_prompt_format

    tokenizer = load_tokenizer(str(run_dir / "sft" / "model"))
    eos = tokenizer.eos_token
    plain = Conversation(read_prompt_format(run_dir / "sft" / "model"), tokenizer)
    assert plain.render("What is self?") == "What is self?\n\n"
    plain.add("What is self?", "The instance.")
    assert plain.render("And cls?\n\n") == f"What is self?\n\nThe instance.{eos}And cls?\n\n"
    plain.system = "Answer briefly."
    assert plain.render("x").startswith("Answer briefly.\n\nWhat is self?")
    plain.reset()
    assert plain.render("x") == "Answer briefly.\n\nx\n\n"

    templated = Conversation(PromptFormat("chat_template"), tokenizer)
    templated.add("hi", "hello")
    assert templated.render("again") == f"### user:\nhi\n### assistant:\nhello{eos}\n### user:\nagain\n### assistant:\n"


@pytest.mark.slow
def test_chat_prompt_answers_once_as_trained(run_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.chat import main

    code = main([str(run_dir), "--prompt", "The for statement", "--temperature", "0", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "align chat: stage sft (sft)" in err and "plain strings, no chat template" in err
    # The same greedy answer as the model gives the prompt written the way training wrote prompts.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft" / "model")
    ids = tokenizer("The for statement\n\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True) + "\n"


class Recording(io.StringIO):
    """A text stream that remembers each write: streamed answers arrive in several."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.slow
@pytest.mark.parametrize("ending", [EOFError, KeyboardInterrupt])
def test_chat_loop_streams_keeps_turns_and_ends_cleanly_on_ctrl_d_or_ctrl_c(run_dir, ending):
    from align.chat import build_parser, chat
    from align.saved import find_model

    lines = iter(["hello there", "/system Be brief.", "second turn", "/reset", "/nope", "   "])

    def read_line(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise ending from None

    out, err = Recording(), io.StringIO()
    args = build_parser().parse_args([str(run_dir), "--temperature", "1", "--max-new-tokens", "12"])
    assert chat(find_model(run_dir), args, read_line, out, err) == 0
    # Counted as writes, not in the text: a sampled answer of this tiny model may itself contain "you> ".
    assert out.writes.count("you> ") == 7 and out.writes.count("model> ") == 2
    assert "(system prompt set)" in err.getvalue() and "(conversation cleared)" in err.getvalue()
    assert "(unknown command /nope" in err.getvalue()


@pytest.mark.slow
def test_answers_are_streamed_word_by_word(run_dir):
    """What the sampled answers above cannot show for sure (this tiny model's answer may be one word, or none): the
    chat's streamer writes decoded text as tokens arrive, not once at the end."""
    import torch
    from transformers import AutoTokenizer

    from align.chat import streamer
    from align.saved import find_model

    tokenizer = AutoTokenizer.from_pretrained(find_model(run_dir).path)
    out = Recording()
    stream = streamer(tokenizer, out)
    stream.put(torch.tensor([tokenizer.encode("the prompt")]))  # skipped: skip_prompt
    for token in tokenizer.encode(" the value of the attribute is used and so on"):
        stream.put(torch.tensor([token]))
    stream.end()
    assert len(out.writes) > 2 and "".join(out.writes) == " the value of the attribute is used and so on"


def wait_for(pane, condition, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = pane()
        if condition(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"timed out; the terminal shows:\n{pane()}")


@pytest.mark.slow
def test_chat_in_a_real_terminal(run_dir, tmp_path):
    """tmux: the banner, two turns answered, /reset, /exit with exit code 0."""
    if shutil.which("tmux") is None:
        if os.environ.get("ALIGN_REQUIRE_TMUX"):
            pytest.fail("tmux is required (ALIGN_REQUIRE_TMUX is set): apt-get install tmux")
        pytest.skip("tmux is not installed")
    align = Path(sys.executable).parent / "align"
    # A private tmux server whose socket lives in tmp_path: nobody else's sessions, nothing left in /tmp/tmux-*.
    server = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    command = f"env HF_HUB_OFFLINE=1 {align} chat {run_dir} --temperature 1 --max-new-tokens 8; echo EXIT=$?; sleep 60"
    subprocess.run([*server, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", command], check=True)

    def pane() -> str:
        return subprocess.run([*server, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def send(text: str) -> None:
        subprocess.run([*server, "send-keys", "-t", "chat", text, "Enter"], check=True)

    try:
        # capture-pane drops trailing spaces: the empty prompt reads "you>".
        shown = wait_for(pane, lambda t: "you>" in t)
        assert "align chat: stage sft (sft)" in shown and "/reset clears the conversation" in shown
        send("hello there")
        wait_for(pane, lambda t: t.count("you>") == 2)
        send("second turn")
        wait_for(pane, lambda t: t.count("you>") == 3)
        send("/reset")
        wait_for(pane, lambda t: "(conversation cleared)" in t and t.count("you>") == 4)
        send("/exit")
        shown = wait_for(pane, lambda t: "EXIT=" in t)
    finally:
        subprocess.run([*server, "kill-server"], capture_output=True)
    print(shown)
    answers = [line for line in shown.splitlines() if line.startswith("model> ")]
    assert len(answers) == 2 and all(len(a) > len("model> ") for a in answers), shown
    assert "EXIT=0" in shown and "Traceback" not in shown


@pytest.mark.slow
def test_chat_compare_answers_with_every_policy_stage(run_dir, capsys):
    from align.chat import main

    code = main(["--compare", str(run_dir), "--prompt", "The for statement", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.index("== lm (lm)") < out.index("== sft (sft)")
    assert "plain text, no chat template" in err and "plain strings, no chat template" in err


@pytest.mark.slow
def test_chat_bad_input_is_one_error_line_and_exit_2(run_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.chat import main

    adapters = tmp_path / "adapters"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")).save_pretrained(adapters)
    config = json.loads((adapters / "adapter_config.json").read_text())
    (adapters / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nobody/gone"}))
    (tmp_path / "empty").mkdir()
    cases = {
        "no model here": [str(tmp_path / "empty")],
        "--stage sf: no such stage": [str(run_dir), "--stage", "sf"],
        "cannot load model 'nobody/gone'": [str(adapters), "--prompt", "x"],
        "--compare answers one prompt": ["--compare", str(run_dir)],
        "is not a run directory": [str(run_dir / "sft" / "model"), "--stage", "sft"],
    }
    for expected, argv in cases.items():
        code = main(argv)
        _, err = capsys.readouterr()
        assert code == 2, err
        assert len(errors(err)) == 1 and expected in errors(err)[0], err
        assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# 3. The model card


def card(model_dir: Path) -> tuple[dict, str]:
    text = (model_dir / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


@pytest.mark.slow
def test_every_saved_model_has_a_card_with_its_lineage(run_dir):
    pipeline = {s["name"]: s for s in json.loads((run_dir / "pipeline.json").read_text())["stages"]}
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    meta, body = card(run_dir / "sft" / "model")
    assert meta["tags"] == ["align", "sft"] and meta["datasets"] == ["python-docs", "python-docs-instruct"]
    assert (meta["license"], meta["license_name"]) == ("other", "psf-2.0") and "base_model" not in meta
    chain = body.split("## How it was made")[1].split("##")[0]
    rows = [line for line in chain.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "`lm`" in rows[0] and "scratch gpt2" in rows[0] and pipeline["lm"]["fingerprint"] in rows[0]
    assert "`sft`" in rows[1] and "`@lm`" in rows[1] and pipeline["sft"]["fingerprint"] in rows[1]
    assert "python-docs-instruct (prompt_completion" in rows[1]
    from align.values import same_decimals

    before, after = same_decimals(summary["metrics"]["eval_loss_before"], summary["metrics"]["eval_loss"])
    assert f"| `sft` | eval_loss (token mean) | {before} | {after} |" in body, "labelled as the console's"
    assert f"transformers {summary['versions']['transformers']}" in body and "align 0.1.0" in body
    assert "never saw in training" in body and "each ending in '\\n\\n'" in body
    assert 'tokenizer("What does the assert statement do?\\n\\n"' in body and "align chat path/to/model" in body
    assert (run_dir / "recipe.yaml").read_text().strip() in body

    meta, body = card(run_dir / "lm" / "model")
    assert meta["tags"] == ["align", "lm"] and meta["datasets"] == ["python-docs"]
    assert "| 1 | `lm` |" in body and "| 2 |" not in body


def test_card_metadata_from_hub_names_and_licenses():
    from align.card import base_model, hub_license
    from align.prompt_format import PromptFormat, generate_usage

    assert base_model("openai-community/openai-gpt") == "openai-community/openai-gpt"
    assert base_model({"model_type": "gpt2"}) is None and base_model("/nowhere/model") is None
    assert hub_license(["CC BY-SA 3.0"]) == {"license": "cc-by-sa-3.0"}
    assert hub_license(["MIT", "Apache-2.0"]) == {"license": "other", "license_name": "mit-and-apache-2.0"}
    assert "AutoPeftModelForCausalLM" in generate_usage(PromptFormat("chat_template"), adapter=True)


# --------------------------------------------------------------------------------------------------
# 4. align push


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: refusals happen before the network is asked."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False], ids=["offline", "no-token"])
def test_push_refuses_offline_or_without_a_token_and_changes_nothing(run_dir, monkeypatch, capsys, no_network, offline):
    from align.cli import main

    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_notARealToken0123456789")
    before = files_state(run_dir)
    code = main(["push", str(run_dir), "--stage", "sft", "--repo-id", "someone/tiny-sft", "--private"])
    _, err = capsys.readouterr()
    assert code == 2 and len(errors(err)) == 1, err
    assert ("the hub is offline" if offline else "no hub token: set HF_TOKEN") in errors(err)[0]
    assert files_state(run_dir) == before


@pytest.mark.slow
def test_push_uploads_the_stage_model_folder_with_the_environment_token(run_dir, monkeypatch, capsys, no_network):
    import huggingface_hub

    import align.runtime
    from align.cli import main

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", folder_path, repo_id))
            return "https://hub.example/commit/1"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    monkeypatch.setattr(align.runtime, "reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code = main(["push", str(run_dir), "--repo-id", "someone/tiny-sft", "--private"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert calls == [
        ("token", "hf_fromTheEnvironment"),
        ("create_repo", "someone/tiny-sft", True),
        ("upload_folder", str(run_dir / "sft" / "model"), "someone/tiny-sft"),
    ]
    assert "pushed" in out


@pytest.mark.slow
def test_push_names_a_missing_stage(run_dir, capsys):
    from align.push import main

    assert main([str(run_dir), "--stage", "dpo", "--repo-id", "someone/x"]) == 2
    assert errors(capsys.readouterr().err) == [f"error: --stage dpo: no such stage in {run_dir} (its stages: lm, sft)"]


def test_chat_compares_greedily_and_takes_a_typed_newline(tmp_path):
    """`--compare` sampled at 0.7, so a side-by-side was noise unless --temperature 0 was given; a `\\n` typed in
    --prompt reached the model as two characters."""
    from align.chat import build_parser, settle

    parse = build_parser().parse_args
    assert settle(parse(["--compare", str(tmp_path), "--prompt", "x"])).temperature == 0.0
    assert settle(parse(["--compare", str(tmp_path), "--prompt", "x", "--temperature", "0.5"])).temperature == 0.5
    assert settle(parse([str(tmp_path)])).temperature == 0.7
    args = settle(parse([str(tmp_path), "--prompt", "Line one.\\nLine two.\\tEnd", "--system", "Be brief.\\n"]))
    assert args.prompt == "Line one.\nLine two.\tEnd" and args.system == "Be brief.\n"


def test_a_stale_stage_is_used_with_a_warning_naming_why(tmp_path, caplog):
    """After `--only sft`, a later dpo stage was made from the sft that run replaced: chat, push and merge still take
    it, and say so, instead of serving it as if it were current."""
    from align.saved import find_model, policy_models

    run = tmp_path / "run"
    stale = "made from earlier stages that an --only run changed; a run without --only reruns it"
    entries = [{"name": "sft", "kind": "sft", "status": "completed"},
               {"name": "dpo", "kind": "dpo", "status": "completed", "stale": stale}]  # fmt: skip
    (run).mkdir()
    (run / "pipeline.json").write_text(json.dumps({"name": "r", "stages": entries}))
    for entry in entries:
        (run / entry["name"] / "model").mkdir(parents=True)
        (run / entry["name"] / "model" / "config.json").write_text("{}")
        (run / entry["name"] / "summary.json").write_text(json.dumps({"status": "completed"}))
    with caplog.at_level("WARNING"):
        assert find_model(run, "sft").stage == "sft"
    assert "stale" not in caplog.text
    with caplog.at_level("WARNING"):
        assert find_model(run).stage == "dpo"
    assert f"stage dpo of {run} is stale: {stale}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert [m.stage for m in policy_models(run)] == ["sft", "dpo"]  # chat --compare
    assert caplog.text.count("is stale") == 1


def test_merge_without_a_stage_in_a_run_without_adapters_says_none_saved_any(tmp_path, capsys):
    from align.cli import main

    run = tmp_path / "run"
    entries = [{"name": "sft", "kind": "sft", "status": "completed"}, {"name": "eval", "kind": "eval",
                                                                       "status": "completed"}]  # fmt: skip
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({"name": "r", "stages": entries}))
    (run / "sft" / "model").mkdir(parents=True)
    (run / "sft" / "model" / "config.json").write_text("{}")
    for entry in entries:
        (run / entry["name"]).mkdir(exist_ok=True)
        (run / entry["name"] / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert main(["merge", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert errors(err) == [f"error: {run}: no completed stage saved LoRA adapters (sft saved full weights): "
                           "nothing to merge"], err  # fmt: skip
    assert "hint: each stage's model/ loads with plain transformers as it is" in err
    assert not (tmp_path / "out").exists()


def test_a_stale_eval_is_said_stale_on_the_card_and_in_did_it_help(tmp_path):
    """An --only run retrained sft after the eval compared it: the card does not credit the new model with the old
    figures, and the report's "Did it help?" says the eval is stale where it shows them (a trial found both)."""
    from align.card import later_evaluations
    from align.report import build_report

    stale = "made from earlier stages that an --only run changed; a run without --only reruns it"
    entries = [{"name": "sft", "kind": "sft", "status": "completed"},
               {"name": "eval", "kind": "eval", "status": "completed", "stale": stale}]  # fmt: skip
    (tmp_path / "pipeline.json").write_text(json.dumps({"name": "r", "stages": entries}))
    models = {"base": {"verdict": {"status": "baseline"}}, "sft": {"win_rate": 0.2, "verdict": {"status": "worse"}}}
    summary = {"stage": "eval", "kind": "eval", "status": "completed",
               "metrics": {"models": models, "baseline": "base", "judge": "j", "prompts": 4},
               "verdict": {"status": "worse", "reasons": ["sft: win rate 0.20"], "warnings": []}}  # fmt: skip
    for name, data in (("sft", {"stage": "sft", "kind": "sft", "status": "completed"}), ("eval", summary)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    (tmp_path / "recipe.yaml").write_text("name: r\nstages: []\n")
    (line,) = later_evaluations(tmp_path, "sft")
    assert line.startswith("- `eval`: stale") and "worse" not in line
    did_it_help = build_report(tmp_path).read_text().split("<h2 id='did-it-help'>")[1].split("<h2>")[0]
    assert f"Stale: {stale}." in did_it_help
