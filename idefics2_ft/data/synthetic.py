"""DocVQA-like records rendered locally: forms with fields, portrait and landscape, several sizes.

Each page is a business form (a title, key/value fields, a small table) drawn with Pillow's own
font. Each record asks about one field; the references hold the written value and a variant, as
DocVQA's do ("$1,204.50" and "1,204.50"). Written as the ``jsonl`` source reads it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# (width, height) of the rendered pages: portrait and landscape, as scanned documents come.
PAGE_SIZES = ((760, 980), (620, 880), (980, 700), (900, 560), (490, 640), (980, 420))
COMPANIES = (
    "Acme Tobacco Co.",
    "Brown & Williamson",
    "Lorillard Research",
    "R.J. Reynolds Industries",
    "Philip Morris",
)
CITIES = ("Winston-Salem, NC", "Louisville, KY", "Greensboro, NC", "Richmond, VA", "New York, NY")
TITLES = ("INVOICE", "PURCHASE ORDER", "EXPENSE REPORT", "SHIPPING NOTICE", "MEMORANDUM")
LONG_QUESTION = "According to the {title} shown in this document, what is written in the field labelled '{key}'?"


REMARKS = (
    "Payment is due within thirty days of the invoice date",
    "Deliver to the loading dock at the rear of the building before noon",
    "Samples were returned to the laboratory for a second analysis",
    "Please contact the regional office for questions about this order",
    "The shipment was delayed by weather and arrived two days late",
)


def _fields(rng: random.Random, long_answers: bool = False) -> dict[str, tuple[str, list[str]]]:
    """Field label -> (value written on the page, reference answers)."""
    amount = rng.randint(100, 99_999) + rng.randint(0, 99) / 100
    written = f"${amount:,.2f}"
    date = f"{rng.choice(('January', 'March', 'June', 'October'))} {rng.randint(1, 28)}, 19{rng.randint(70, 99)}"
    number = str(rng.randint(10_000, 999_999))
    company = rng.choice(COMPANIES)
    city = rng.choice(CITIES)
    fields = {
        "Number": (number, [number]),
        "Date": (date, [date]),
        "Total": (written, [written, written.lstrip("$")]),
        "Company": (company, [company]),
        "Address": (f"{rng.randint(10, 999)} Main Street, {city}", [f"{city}"]),
    }
    if long_answers:  # a sentence to read back: answers of 10-13 words beside those of 1-4
        remark = rng.choice(REMARKS)
        fields["Remarks"] = (remark, [remark])
    return fields


def render_page(size: tuple[int, int], title: str, fields: dict[str, tuple[str, list[str]]], rng: random.Random):
    width, height = size
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    scale = min(width, height) / 700
    big = ImageFont.load_default(size=max(14, int(34 * scale)))
    font = ImageFont.load_default(size=max(10, int(20 * scale)))
    margin = int(40 * scale)
    draw.text((margin, margin), title, fill="black", font=big)
    y = margin + int(70 * scale)
    for key, (value, _) in fields.items():
        draw.text((margin, y), f"{key}:", fill="black", font=font)
        draw.text((margin + int(170 * scale), y), value, fill=(20, 20, 90), font=font)
        y += int(36 * scale)
    y += int(20 * scale)
    for row in range(rng.randint(2, 5)):  # a small table of line items
        top = y + row * int(30 * scale)
        if top + int(30 * scale) > height - margin:
            break
        draw.rectangle((margin, top, width - margin, top + int(30 * scale)), outline="gray")
        draw.text((margin + 6, top + 4), f"Item {row + 1}   qty {rng.randint(1, 40)}", fill="black", font=font)
    return page


def write_docs(
    folder: str | Path, n_train: int, n_val: int, seed: int = 0, sizes=PAGE_SIZES, long_answers: bool = False
) -> dict[str, Path]:
    """Render ``n_train + n_val`` pages with one question each; returns ``{"train": jsonl, "val": jsonl}``.

    ``long_answers`` adds a "Remarks" field holding a sentence, asked about as often as each other field.
    """
    folder = Path(folder)
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = {}
    for split, count in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(count):
            size = sizes[rng.randrange(len(sizes))]
            title = rng.choice(TITLES)
            fields = _fields(rng, long_answers)
            image = f"pages/{split}-{i:05d}.png"
            render_page(size, title, fields, rng).save(folder / image)
            key = rng.choice(list(fields))
            long = rng.random() < 0.3
            question = LONG_QUESTION.format(title=title.lower(), key=key) if long else f"What is the {key.lower()}?"
            answers = fields[key][1]
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
            ]
            record = {"images": [image], "messages": messages, "answers": answers, "question_type": key.lower()}
            lines.append(json.dumps(record))
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")  # generated pages for tests and benchmarks, in a folder made for them
        out[split] = path
    return out
