"""A merged export served by `transformers serve` (transformers' OpenAI-compatible server) and asked
through the ``openai`` client answers as ``idefics2-ft predict`` does (`make test-serve`; the
``serve`` extra), from the export's own files alone: its chat template, processor (image splitting
off and on) and generation config.

Two tiny runs of the fast tier's kind, each a different check:

- **babbling** (the fast tier's 4 steps at lr 1e-3 from a random base): every answer is 64 tokens
  that change with the image and the question, so a different prompt or picture (another chat
  template, image size or splitting) shows as a different answer; with and without image splitting.
- **answering** (``trained_run``'s 6 steps at lr 5e-3): every answer is a short "no" ended by
  ``<end_of_utterance>``. A server that stops elsewhere (at ``</s>`` only) generates on to the
  length limit, and its token count shows it (the text alone may not: this model repeats
  ``<end_of_utterance>``, which decoding skips).

Each answer is compared with ``answer()``, the function behind ``idefics2-ft predict``, on the same
export, as are the prompt's and the answer's token counts; the first question of the babbling run
with splitting also goes through the ``idefics2-ft predict`` command itself."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import IDEFICS2_FT, TINY_RUN, compose_config

pytestmark = pytest.mark.serve

MAX_NEW_TOKENS = 64  # idefics2-ft predict's default (max_new_tokens=64)
QUESTIONS = 6  # easy-VQA test questions asked per export, each about another image
TRAINING = {"babbling": [], "answering": ["trainer.max_steps=6", "optim.lr=5e-3"]}  # on top of TINY_RUN
CASES = [("babbling", False), ("babbling", True), ("answering", True)]
PREDICT_COMMAND_CASE = ("babbling", True)  # the case whose first question also goes through `idefics2-ft predict`
START_TIMEOUT_S = 300  # loading the tiny export takes ~15 s on an idle 2-core machine
TRANSFORMERS = str(Path(sys.executable).parent / "transformers")  # the transformers CLI of this venv


@pytest.fixture(
    scope="module", params=CASES, ids=[f"{kind}-{'splitting' if split else 'no-splitting'}" for kind, split in CASES]
)
def exported(request, tmp_path_factory, tiny_cache):
    """A tiny run (``babbling`` or ``answering``) trained with ``data.do_image_splitting`` off or on,
    and its merged export: ``(kind, splitting, run_dir, export_dir)``."""
    from idefics2_ft.cli.arguments import parse_overrides
    from idefics2_ft.tasks.export import export_run
    from idefics2_ft.tasks.train import train

    kind, splitting = request.param
    run_dir = tmp_path_factory.mktemp(f"serve-{request.param_index}") / "run"
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", f"run_dir={run_dir}", "name=serve"]
    train(compose_config([*overrides, *TRAINING[kind], f"data.do_image_splitting={str(splitting).lower()}"]))
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    assert cfg.data.do_image_splitting is splitting
    export_dir, _ = export_run(cfg)
    return kind, splitting, run_dir, export_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


@pytest.fixture
def server(exported, tmp_path):
    """``transformers serve EXPORT`` on a free port of 127.0.0.1, offline, its log in a file (printed
    when the test fails): ``(base_url, model, log)``. Stopped afterwards whatever happened: SIGTERM to
    its process group (the server and the model's process it spawns), then SIGKILL."""
    export_dir = exported[-1]
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # --device cpu: predict runs the export on the CPU; the server would pick a GPU where there is one
    command = [TRANSFORMERS, "serve", str(export_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the model loads before the server listens: /health answers once it can generate
            if process.poll() is not None:
                pytest.fail(
                    f"transformers serve exited with {process.returncode} before answering; {log}:\n{log_tail(log)}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"transformers serve did not answer {base}/health within {START_TIMEOUT_S} s; {log}:\n{log_tail(log)}"
                )
            time.sleep(0.5)
        yield f"{base}/v1", str(export_dir), log
    finally:
        for stop in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: whatever of the group is left after 20 s
            try:
                os.killpg(process.pid, stop)
                process.wait(timeout=20)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        print(f"--- transformers serve log ({log}) ---\n{log_tail(log, 20000)}")  # shown when the test failed


def easy_vqa_cases(n: int) -> list[tuple[str, str]]:
    """``n`` test questions of easy-VQA (image path, question), each about another image, of every kind."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    questions, _, image_ids = easy_vqa.get_test_questions()
    cases, seen = [], set()
    for question, image_id in zip(questions, image_ids, strict=True):
        if image_id not in seen:
            seen.add(image_id)
            cases.append((paths[image_id], question))
        if len(cases) == n:
            return cases
    raise AssertionError(f"easy-VQA has fewer than {n} test images")


def ask(client, model: str, image: str, question: str):
    """One chat completion as an OpenAI client sends it: the image as a base64 data URL, greedy."""
    data = base64.b64encode(Path(image).read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": question},
    ]
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=MAX_NEW_TOKENS,
    )


def test_the_served_export_answers_as_predict(exported, server):
    from openai import OpenAI

    from idefics2_ft.cli.arguments import parse_overrides
    from idefics2_ft.data.images import load_image
    from idefics2_ft.tasks.evaluate import answer, load_run

    kind, splitting, run_dir, export_dir = exported
    base_url, model_name, log = server
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    model, processor = load_run(cfg, model_dir=str(export_dir))  # what predict model_dir=EXPORT loads
    counts: list[tuple[int, int]] = []  # (prompt tokens, answer tokens) of each answer() call
    generate = model.generate

    def counting_generate(**kwargs):
        out = generate(**kwargs)
        prompt = kwargs["input_ids"].shape[1]
        counts.append((prompt, out.shape[1] - prompt))
        return out

    model.generate = counting_generate
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    cases = easy_vqa_cases(QUESTIONS)
    rows = []
    for image, question in cases:
        reply = ask(client, model_name, image, question)
        expected = answer(model, processor, [load_image(image)], question=question, max_new_tokens=MAX_NEW_TOKENS)
        served = reply.choices[0].message.content
        rows.append(
            (question, served, expected, (reply.usage.prompt_tokens, reply.usage.completion_tokens), counts[-1])
        )
    table = "\n".join(f"  {q!r}: served {s!r} ({su}), predict {e!r} ({eu})" for q, s, e, su, eu in rows)
    where = f"\n(prompt tokens, answer tokens) in brackets; the server's log: {log}"
    assert all(s == e for _, s, e, _, _ in rows), f"the served export answers otherwise:\n{table}{where}"
    assert all(su == eu for _, _, _, su, eu in rows), f"same answers, other token counts:\n{table}{where}"
    print(table)
    # what makes each comparison worth something (see the docstring)
    if kind == "babbling":
        assert len({s for _, s, _, _, _ in rows}) > 2, f"few distinct answers: a weak comparison\n{table}"
    else:
        assert all(su[1] < MAX_NEW_TOKENS for _, _, _, su, _ in rows), f"not every answer stopped\n{table}"

    if (kind, splitting) != PREDICT_COMMAND_CASE:
        return
    image, question = cases[0]  # the predict command itself, as a user runs it
    predicted = subprocess.run(
        [
            IDEFICS2_FT,
            "predict",
            f"run_dir={run_dir}",
            f"model_dir={export_dir}",
            f"image={image}",
            f"question={question}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stdout == rows[0][1] + "\n", (predicted.stdout, rows[0][1])
