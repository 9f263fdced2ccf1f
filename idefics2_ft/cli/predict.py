"""Answer a question about one or more images with a finished run.

    idefics2-ft predict run_dir=RUN image=a.png[,b.png] question="What is the total?"
    idefics2-ft predict run_dir=RUN chat=conversation.json    # {"images": [...], "messages": [...]}

Uses the processor's chat template with add_generation_prompt=True and greedy decoding.
"""

import json
import sys
from pathlib import Path

from idefics2_ft.cli.arguments import parse_overrides, setup_logging
from idefics2_ft.data.images import load_image
from idefics2_ft.data.records import DataError
from idefics2_ft.tasks.evaluate import answer, load_run


def open_image(path: str):
    """The image at ``path``, or one line saying why not (a missing, empty or unreadable file, a URL)."""
    if path.startswith(("http://", "https://")):
        raise DataError(f"image={path}: a URL; images are not fetched: download it and give its local path.")
    if not Path(path).is_file():
        raise DataError(f"image={path}: no such file.")
    if Path(path).stat().st_size == 0:
        raise DataError(f"image={path}: the file is empty (0 bytes).")
    try:
        return load_image(path)
    except Exception as err:  # Pillow raises many types for a file it cannot read
        raise DataError(
            f"image={path}: not an image Pillow can read ({type(err).__name__}): give a PNG or JPEG."
        ) from None


def main(argv: list[str]) -> int:
    setup_logging()
    cfg, own = parse_overrides(
        argv, {"image": None, "question": None, "chat": None, "model_dir": None, "max_new_tokens": "64"}
    )
    try:
        if own["chat"]:
            chat = json.loads(Path(own["chat"]).read_text())
            folder = Path(own["chat"]).resolve().parent
            images = [open_image(str(folder / p)) for p in chat.get("images", [])]
            messages = chat["messages"]
            question = None
        else:
            if not own["question"]:
                raise SystemExit('question="..." (with image=PATH[,PATH]) or chat=FILE.json is required.')
            images = [open_image(p) for p in own["image"].split(",")] if own["image"] else []
            messages, question = None, own["question"]
        model, processor = load_run(cfg, model_dir=own["model_dir"])
    except (DataError, FileNotFoundError) as err:
        sys.stderr.write(f"predict failed: {err}\n")
        return 2
    text = answer(
        model, processor, images, question=question, messages=messages, max_new_tokens=int(own["max_new_tokens"])
    )
    sys.stdout.write(text + "\n")
    return 0
