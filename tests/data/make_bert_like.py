"""Regenerate bert_like.*.onnx: a tiny BERT-like encoder exported by both PyTorch exporters.

It has what makes transformer exports hard to verify with random inputs: token ids and
token-type ids that index embedding tables (30 and 2 rows), and an integer attention mask
turned into an additive float mask. Run with a Python that has torch and onnxscript:
  /work/venv-export/bin/python tests/data/make_bert_like.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
VOCAB, TYPES, POSITIONS, HIDDEN = 30, 2, 16, 16


class BertLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.token_types = nn.Embedding(TYPES, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids, token_type_ids, attention_mask):
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        x = self.words(input_ids) + self.positions(positions) + self.token_types(token_type_ids)
        x = self.norm(x)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # As transformers does it: (1 - mask) * the dtype's lowest value, added to the scores.
        mask = (1.0 - attention_mask[:, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        scores = q @ k.transpose(-1, -2) / HIDDEN ** 0.5 + mask
        return self.out(scores.softmax(-1) @ v)


def main():
    torch.manual_seed(0)
    model = BertLike().eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    args = (ids, torch.zeros_like(ids), torch.ones_like(ids))
    names = dict(input_names=["input_ids", "token_type_ids", "attention_mask"], output_names=["hidden"])
    torch.onnx.export(model, args, HERE / "bert_like.ts.onnx", dynamo=False, opset_version=17, **names)
    program = torch.onnx.export(model, args, dynamo=True, **names)
    program.save(str(HERE / "bert_like.dynamo.onnx"))


if __name__ == "__main__":
    main()
