"""The chat template published with HuggingFaceM4/idefics2-8b.

Turns render as ``User:`` / ``Assistant:`` + content, each closed by ``<end_of_utterance>\\n``; a turn
that opens with an image has no space after the colon. The generation prompt is ``Assistant:``.
A processor built locally has no template (``chat_template is None``): ``load_processor`` sets this one.
"""

IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
