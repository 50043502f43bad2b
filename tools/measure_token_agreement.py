#!/usr/bin/env python
"""How often two Qwen tokenizers cut one prompt the same way, and what c2c_core.tokens does where they do not.

Reads the tokenizer files a ComfyUI host ships (comfy/text_encoders/qwen25_tokenizer: Qwen2.5-VL, Qwen-Image's
text encoder, and - in 0.33.0 - Qwen3-VL, whose tokenizer class loads the same folder; qwen35_tokenizer:
Qwen3.5, a different BPE, as a tokenizer that really disagrees). Prompts are generated here (seeded): English
scene descriptions, long prompts, numbers, code, CJK, emoji, quoted sign text. Each prompt is wrapped in
Qwen-Image's chat template, tokenized by both with character offsets, aligned with c2c_core.tokens, and
counted:

    python tools/measure_token_agreement.py [--host .host/ComfyUI-0.33.0] [--prompts 400] [--json out.json]

Per receiver token (Qwen2.5): ``exact`` (a sharer token with the same span), ``split`` (the sharer cuts it in
several tokens that end where it ends), ``straddled`` (a sharer token runs past its end: the causal rule reads
the sharer token before). Needs transformers and tokenizers (in the test venv), never a network.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                       "<|im_end|>\n<|im_start|>assistant\n")

SUBJECTS = ["a red fox", "two old fishermen", "a glass teapot", "an astronaut", "a bakery storefront", "three kittens",
            "a vintage motorcycle", "a lighthouse", "a bowl of ramen", "a violinist", "a paper crane", "a robot barista"]
PLACES = ["on a foggy pier", "in a neon-lit alley", "under cherry blossoms", "on the surface of Mars",
          "in a sunlit greenhouse", "beside a frozen lake", "at a crowded night market", "inside a library"]
STYLES = ["photorealistic, 35mm film grain", "watercolor illustration", "isometric 3D render", "ukiyo-e woodblock print",
          "cinematic lighting, shallow depth of field", "flat vector poster", "oil painting with thick impasto"]
SIGNS = ["OPEN 24/7", "Café Müller — since 1952", "SALE 50% OFF!!!", "Exit →", "Don't panic", "No. 42, Baker St.",
         "WELCOME TO SPRINGFIELD", "α-β testing lab"]
NUMBERS = ["$1,299.99", "3.14159", "2026-12-06", "+44 20 7946 0958", "1/3 cup", "10,000 m²", "version 2.5.1",
           "12:45 pm", "#FF8800", "0.0001%", "1e-6", "x86_64"]
CODE = ["def area(r):\n    return 3.14159 * r ** 2", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "SELECT name, price FROM items WHERE price > 100;", "console.log(`Hello, ${name}!`);",
        "x = [i**2 for i in range(10) if i % 2]", "<div class=\"card\">{{ title }}</div>"]
CJK = ["一只橘猫坐在窗台上，窗外下着小雨。", "古老的石桥横跨在清澈的河流之上", "東京タワーの夜景、雨上がりの街",
       "桜の木の下でお弁当を食べる家族", "서울의 밤거리, 네온사인이 빛난다", "招牌上写着“欢迎光临”四个大字",
       "海边的灯塔，夕阳西下，金色的光芒"]
EMOJI = ["🐱", "🚀✨", "🍜🔥", "👩‍🚀", "🇯🇵", "❤️", "🎉🎂🎈", "😀😃😄"]


def prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(category, text) pairs, about n in all, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = ["english", "long", "numbers", "code", "cjk", "emoji", "sign"][i % 7]
        s, p, st = rng.choice(SUBJECTS), rng.choice(PLACES), rng.choice(STYLES)
        if kind == "english":
            text = f"{s.capitalize()} {p}, {st}."
        elif kind == "long":
            text = " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(PLACES)}, {rng.choice(STYLES)}."
                            for _ in range(rng.randint(6, 12)))
        elif kind == "numbers":
            text = f"A price tag showing {rng.choice(NUMBERS)} next to {s}, dated {rng.choice(NUMBERS)}."
        elif kind == "code":
            text = f"A laptop screen with the code:\n{rng.choice(CODE)}\n{p}."
        elif kind == "cjk":
            text = rng.choice(CJK) + ("" if rng.random() < 0.5 else f" {s}, {st}")
        elif kind == "emoji":
            text = f"{s.capitalize()} {rng.choice(EMOJI)} {p} {rng.choice(EMOJI)}"
        else:
            text = f"{s.capitalize()} {p}, holding a sign that says \"{rng.choice(SIGNS)}\"."
        out.append((kind, text))
    return out


def load_tokenizers(text_encoders: Path) -> dict:
    """{name: callable(text) -> [(start, end)]} for the tokenizer folders the host has."""
    from transformers import Qwen2Tokenizer

    out = {}
    qwen25 = Qwen2Tokenizer.from_pretrained(str(text_encoders / "qwen25_tokenizer"))
    out["qwen2.5-vl"] = _offsets(qwen25)
    if (text_encoders / "qwen3vl.py").exists():
        source = (text_encoders / "qwen3vl.py").read_text()
        folder = "qwen25_tokenizer" if '"qwen25_tokenizer"' in source else None
        if folder:      # the host's Qwen3-VL tokenizer class loads this folder: load it again, as the host does
            out["qwen3-vl"] = _offsets(Qwen2Tokenizer.from_pretrained(str(text_encoders / folder)))
    if (text_encoders / "qwen35_tokenizer").exists():
        out["qwen3.5"] = _offsets(_bpe_from_merges(text_encoders / "qwen35_tokenizer"))
    return out


def _offsets(tok):
    def run(text):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        return [tuple(o) for o in enc["offset_mapping"]]
    return run


def _bpe_from_merges(folder: Path):
    """A byte-level BPE from merges.txt alone (ComfyUI ships Qwen3.5's without vocab.json): ids do not matter
    for where tokens are cut, only merge ranks, the pre-tokenizer regex and the special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    merges = [tuple(line.split(" ", 1)) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pretokenize_regex"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t["content"], special=True, normalized=False)
                            for t in config["added_tokens_decoder"].values()])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def check_rebuild(text_encoders: Path, items: list) -> str:
    """The method's own check: Qwen2.5's tokenizer rebuilt from its merges.txt alone (as Qwen3.5's is) against
    the shipped one, on every prompt."""
    import shutil
    import tempfile

    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(text_encoders / "qwen25_tokenizer" / "merges.txt", folder)
        config = json.loads((text_encoders / "qwen25_tokenizer" / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pretokenize_regex": PRETOKENIZE_REGEX}))
        rebuilt = _offsets(_bpe_from_merges(folder))
    shipped = _offsets(Qwen2Tokenizer.from_pretrained(str(text_encoders / "qwen25_tokenizer")))
    same = sum(rebuilt(QWEN_IMAGE_TEMPLATE.format(t)) == shipped(QWEN_IMAGE_TEMPLATE.format(t)) for _, t in items)
    return f"method check: Qwen2.5 rebuilt from merges.txt alone cuts {same} of {len(items)} prompts as the shipped one"


def classify(receiver: list, sharer: list) -> Counter:
    """exact / split / straddled counts over the receiver's tokens (module docstring)."""
    spans_s = set(sharer)
    ends_s = {e for _, e in sharer}
    counts = Counter()
    for span in receiver:
        if span in spans_s:
            counts["exact"] += 1
        elif span[1] in ends_s:
            counts["split"] += 1
        else:
            counts["straddled"] += 1
    return counts


def measure(tokenizers: dict, items: list, receiver: str = "qwen2.5-vl") -> dict:
    from c2c_core.tokens import TokenLayout, align_tokens

    results = {}
    for name, sharer_tok in tokenizers.items():
        if name == receiver:
            continue
        per_kind: dict = {}
        for kind, prompt in items:
            text = QWEN_IMAGE_TEMPLATE.format(prompt)
            r, s = tokenizers[receiver](text), sharer_tok(text)
            index = align_tokens(TokenLayout(tuple(r)), TokenLayout(tuple(s))).tolist()   # must align every prompt
            assert all(s[i][1] <= r[j][1] for j, i in enumerate(index)), "causal rule broken"
            row = per_kind.setdefault(kind, Counter())
            row["prompts"] += 1
            row["identical"] += r == s
            row["receiver_tokens"] += len(r)
            row["sharer_tokens"] += len(s)
            row.update(classify(r, s))
        total = sum(per_kind.values(), Counter())
        results[name] = {"all": dict(total), **{k: dict(v) for k, v in per_kind.items()}}
    return results


def report(results: dict) -> str:
    lines = []
    for name, rows in results.items():
        lines.append(f"\nqwen2.5-vl (receiver) vs {name} (sharer)")
        lines.append(f"{'prompts':<10}{'n':>5}{'identical':>11}{'tokens r/s':>14}{'exact':>9}{'split':>8}{'straddled':>11}")
        for kind, c in rows.items():
            n, t = c["prompts"], c["receiver_tokens"]
            lines.append(f"{kind:<10}{n:>5}{c['identical'] / n:>11.1%}{t:>7}/{c['sharer_tokens']:<6}"
                         f"{c.get('exact', 0) / t:>9.2%}{c.get('split', 0) / t:>8.2%}{c.get('straddled', 0) / t:>11.2%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", type=Path, default=ROOT / ".host" / "ComfyUI-0.33.0")
    parser.add_argument("--prompts", type=int, default=420)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    text_encoders = args.host / "comfy" / "text_encoders"
    items = prompts(args.prompts, args.seed)
    tokenizers = load_tokenizers(text_encoders)
    results = measure(tokenizers, items)
    print(report(results))
    if "qwen3.5" in tokenizers:
        print("\n" + check_rebuild(text_encoders, items))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
