"""tools/train_projector.py --pair text on the tiny Qwen models: the command line's own ``main``, with its
text-model loader swapped for the tiny models' (the stock CLIPLoader / UNETLoader code fixes Qwen's full widths by
class, tools/make_tiny_qwen.py says why). Launched by tests/training/test_text_training.py, under torchrun."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import make_tiny_qwen  # noqa: E402
import train_projector  # noqa: E402


def tiny_text_models(args):
    return (make_tiny_qwen.load_tiny_clip(args.sharer), make_tiny_qwen.load_tiny_clip(args.receiver),
            make_tiny_qwen.load_tiny_qwen_image(args.dit))


if __name__ == "__main__":
    train_projector.load_text_models = tiny_text_models
    sys.exit(train_projector.main(sys.argv[1:]))
