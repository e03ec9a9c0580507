"""Writes model/keys.txt (the recognizer's character list, from the model's `character`
metadata) and the test images in testdata/ (text rendered with Pillow's built-in font).
Run after fetch.sh: `python3 model/make_testdata.py` (needs onnx and Pillow)."""
import os
import onnx
from PIL import Image, ImageDraw, ImageFont

here = os.path.dirname(os.path.abspath(__file__))
model = onnx.load(os.path.join(here, "rec.onnx"))
chars = dict((p.key, p.value) for p in model.metadata_props)["character"]
with open(os.path.join(here, "keys.txt"), "w", encoding="utf-8") as f:
    f.write(chars)
font = ImageFont.load_default(size=32)
for text in ["Kiln serves models", "Hello, World 2026"]:
    img = Image.new("RGB", (int(font.getlength(text)) + 16, 48), "white")
    ImageDraw.Draw(img).text((8, 6), text, fill="black", font=font)
    img.save(os.path.join(here, "..", "testdata", text.replace(" ", "_").replace(",", "") + ".png"))
