"""Export the public-model benchmark set behind `make bench-public` into build/benchset/.

Public model code (torchvision, transformers, timm, ultralytics) built from configs with
random weights and fixed seeds: nothing is downloaded. Each model is exported with the
TorchScript exporter (opset 17) and with the dynamo exporter (its defaults, as a new user
gets them); an export that fails is skipped with its reason. Every export runs in its own
process, so that a hang or a crash costs one entry, not the set.

Runs in the benchset venv (`make benchset`), never in onnxfold's own: these libraries are
no dependency of onnxfold.

    python bench/public/make_set.py [--out build/benchset] [--only NAME,...] [--exporters torchscript,dynamo]

BatchNorm statistics are randomized too (a fresh BatchNorm is nearly the identity).
Writes OUT/NAME.EXPORTER.onnx, its entry OUT/NAME.EXPORTER.onnx.json, and OUT/manifest.json: per file its model, exporter, input
names, shapes and dtypes, and for integer inputs the range [low, high] (inclusive) that
indexes the model's embedding tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
TIMEOUT_S = 600


# --- model builders: (module, [(input name, shape, dtype, range or None)]) ------------------

def image(shape):
    return [("input", list(shape), "float32", None)]


def tv(name, **kwargs):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None, **kwargs), image((1, 3, 224, 224))
    return build


def tv_vit_small():
    # torchvision's ViT code at ViT-S/16 size: vit_b_16 (86M parameters) would make the
    # latency rounds of the set take most of its run time on 2 cores.
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=224, patch_size=16, num_layers=6, num_heads=6,
                              hidden_dim=384, mlp_dim=1536)
    return model, image((1, 3, 224, 224))


class HFLogits:
    """Wrap a transformers model so that it returns plain tensors, not a ModelOutput."""

    @staticmethod
    def wrap(model, key):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return self.model(*args, return_dict=True)[key]
        return Wrapped()


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                       image_size=224, patch_size=16, num_labels=1000)
    model = ViTForImageClassification(config)
    return HFLogits.wrap(model, "logits"), [("pixel_values", [1, 3, 224, 224], "float32", None)]


def hf_bert():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512, type_vocab_size=2)
    model = BertModel(config, add_pooling_layer=True)
    seq = 128
    inputs = [("input_ids", [1, seq], "int64", [0, config.vocab_size - 1]),
              ("attention_mask", [1, seq], "int64", [0, 1]),
              ("token_type_ids", [1, seq], "int64", [0, config.type_vocab_size - 1])]
    return HFLogits.wrap(model, "last_hidden_state"), inputs


def hf_mobilevit():
    from transformers import MobileViTConfig, MobileViTForImageClassification
    config = MobileViTConfig(image_size=256, hidden_sizes=[64, 80, 96],
                             neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], num_labels=1000)  # XXS
    model = MobileViTForImageClassification(config)
    return HFLogits.wrap(model, "logits"), [("pixel_values", [1, 3, 256, 256], "float32", None)]


def hf_levit():
    from transformers import LevitConfig, LevitForImageClassification
    model = LevitForImageClassification(LevitConfig(num_labels=1000))  # LeViT-128S
    return HFLogits.wrap(model, "logits"), [("pixel_values", [1, 3, 224, 224], "float32", None)]


def timm_model(name):
    def build():
        import timm
        return timm.create_model(name, pretrained=False), image((1, 3, 224, 224))
    return build


def ultralytics_model(yaml, size):
    def build():
        import ultralytics
        family = ultralytics.RTDETR if yaml.startswith("rtdetr") else ultralytics.YOLO
        model = family(yaml).model  # built from the yaml: random weights, nothing downloaded
        for module in model.modules():  # the head's export form, as ultralytics' exporter sets it
            if hasattr(module, "export"):
                module.export = True
                module.format = "onnx"
        return Single(model), [("images", [1, 3, size, size], "float32", None)]
    return build


def Single(model):
    """The first output only: ultralytics' heads return (predictions, extras) in eval mode."""
    import torch

    class First(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            y = self.model(x)
            return y[0] if isinstance(y, (tuple, list)) else y
    return First()


MODELS = {
    "tv_resnet18": tv("resnet18"),
    "tv_mobilenet_v3_small": tv("mobilenet_v3_small"),
    "tv_densenet121": tv("densenet121"),
    "tv_swin_t": tv("swin_t"),
    "tv_vit_s16": tv_vit_small,
    "hf_vit": hf_vit,
    "hf_bert": hf_bert,
    "hf_mobilevit": hf_mobilevit,
    "hf_levit": hf_levit,
    "timm_repvgg_a0": timm_model("repvgg_a0"),
    "timm_mobileone_s0": timm_model("mobileone_s0"),
    "timm_fastvit_t8": timm_model("fastvit_t8"),
    "timm_levit_128s": timm_model("levit_128s"),
    "yolov8n": ultralytics_model("yolov8n.yaml", 640),
    "rtdetr_l": ultralytics_model("rtdetr-l.yaml", 320),
}


# --- one export, in its own process ----------------------------------------------------------

def example_inputs(inputs, seed):
    import torch
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for _, shape, dtype, bounds in inputs:
        if bounds is None:
            tensors.append(torch.randn(shape, generator=generator))
        else:
            tensors.append(torch.randint(bounds[0], bounds[1] + 1, shape, generator=generator, dtype=torch.int64))
    return tuple(tensors)


_STUB_LIBRARY = []


def stub_torchvision_ops():
    """Declare torchvision's two custom ops that its import registers fakes for.

    The torchvision wheel on the package index is built for CUDA: its native library does
    not load against the CPU torch, and importing torchvision then fails on
    `torchvision::nms`. None of the models here calls those ops.
    """
    import torch
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _STUB_LIBRARY.append(library)


def export_one(name, exporter, path) -> dict:
    import torch
    stub_torchvision_ops()
    # nn.MultiheadAttention's inference fast path is one fused op the TorchScript exporter
    # cannot write (aten::_native_multi_head_attention); the plain path exports.
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    randomize_batchnorm(model)
    model.eval()
    args = example_inputs(inputs, seed=0)
    names = [i[0] for i in inputs]
    started = time.perf_counter()
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(model, args, str(path), opset_version=OPSET, dynamo=False,
                              input_names=names, output_names=["output"])
        else:
            program = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=["output"])
            program.save(str(path), external_data=False)
    seconds = time.perf_counter() - started
    return {"inputs": [{"name": n, "shape": s, "dtype": d, **({"range": r} if r else {})}
                       for n, s, d, r in inputs], "export_seconds": round(seconds, 2)}


def run_child(name, exporter, path) -> dict:
    """export_one in a fresh process; its entry, or {'error': reason}."""
    command = [sys.executable, __file__, "--child", name, exporter, str(path)]
    env = {**os.environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
        error = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1])
        return {"error": f"exit code {done.returncode}: {error.strip()[:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def randomize_batchnorm(model, seed=1):
    """Random BatchNorm statistics and affine parameters (fixed seed).

    Freshly built, a BatchNorm has mean 0, variance 1, weight 1 and bias 0: folding it is
    nearly the identity and parity would prove little. Trained-like values make it count.
    """
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                n = module.running_mean.numel()
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def write_manifest(folder):
    """manifest.json from every export's own NAME.EXPORTER.json (so runs may go side by side)."""
    entries = [json.loads(p.read_text()) for p in folder.glob("*.onnx.json")
               if (folder / p.name.removesuffix(".json")).exists()]
    entries.sort(key=lambda e: (list(MODELS).index(e["name"]) if e["name"] in MODELS else 99, e["exporter"]))
    (folder / "manifest.json").write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        name, exporter, path = argv[1:4]
        print(json.dumps(export_one(name, exporter, Path(path))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "benchset")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    versions = {"torch": torch.__version__}
    for name in names:
        for exporter in args.exporters.split(","):
            file = f"{name}.{exporter}.onnx"
            sidecar = args.out / f"{file}.json"
            sidecar.unlink(missing_ok=True)
            entry = run_child(name, exporter, args.out / file)
            if "error" in entry:
                print(f"{file}: skipped: {entry['error']}", flush=True)
                (args.out / file).unlink(missing_ok=True)
                continue
            entry = {"name": name, "exporter": exporter, "file": file, **entry, "versions": versions}
            sidecar.write_text(json.dumps(entry) + "\n")
            size = (args.out / file).stat().st_size / 2**20
            print(f"{file}: exported in {entry['export_seconds']:.1f} s, {size:.1f} MiB", flush=True)
    entries = write_manifest(args.out)
    print(f"{len(entries)} models in {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
