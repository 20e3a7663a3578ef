#!/usr/bin/env python3
"""Write the perf_analyzer input-data files for the qwen2_5_vl model (text and image cases).

Images travel as `data:` URL strings inside the BYTES `image` tensor, which the model
accepts, so the JSON stays plain text (no length-prefixed binary `b64` elements needed).

    python bench/perf_analyzer/make_inputs.py   # rewrites text.json and image.json here
"""
import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SAMPLING = json.dumps({"max_tokens": 64, "temperature": 0})
FLAGS = {"stream": [True], "exclude_input_in_output": [True],
         "return_finish_reason": [True], "return_num_output_tokens": [True]}


def sample_jpeg(size=(448, 336)) -> str:
    image = Image.new("RGB", size, (40, 110, 190))
    draw = ImageDraw.Draw(image)
    draw.ellipse((120, 80, 320, 260), fill=(240, 200, 40))
    draw.rectangle((20, 260, 428, 320), fill=(30, 150, 60))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def case(messages, images=()):
    entry = {"messages": [json.dumps(messages, ensure_ascii=False)],
             "sampling_parameters": [SAMPLING], **FLAGS}
    if images:
        entry["image"] = {"content": list(images), "shape": [len(images)]}
    return entry


def main():
    text = [case([{"role": "user", "content": prompt}]) for prompt in (
        "Explain in two sentences why streaming responses improve perceived latency.",
        "请用一句话介绍长城。",
    )]
    image = [case([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."}]}], [sample_jpeg()])]
    for name, data in (("text.json", text), ("image.json", image)):
        (HERE / name).write_text(json.dumps({"data": data}, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
