"""Small synthetic nets, one per channel pattern the compaction engine must handle, and the oracle check."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from slimtorch import apply_masks_, compact_
from slimtorch.graph import build_graph
from slimtorch.prune.coupled import implied_param_count


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random BatchNorm statistics and random values for every constant parameter (LayerNorm weights of 1,
    zero biases, zero-initialised heads), so that dropped offsets or wrong scales cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def graph_structure(graph) -> tuple:
    """A comparable description of everything pruning reads from a graph: each member's channels as a
    partition (units renumbered by first appearance), blocked units, equal-count constraints, fix sites,
    layers not reached and unknown ops."""
    roots, ids = graph.uf.roots(), {}

    def canon(labels):
        if labels is None:
            return None
        units = torch.where(labels >= 0, roots[labels.clamp(min=0)], labels).reshape(-1).tolist()
        return tuple(labels.shape), tuple(ids.setdefault(u, len(ids)) if u >= 0 else -1 for u in units)

    members = [(k, canon(m.labels), m.groups, m.other_dim, m.is_buffer)
               for k, m in sorted(graph.members.items(), key=lambda kv: repr(kv[0]))]
    blocked = sorted(ids.get(u, -2) for u in graph.blocked_units())  # -2: a unit no member holds
    constraints = sorted(canon(rows) for rows in graph.constraints)
    fixes = [(f.key, f.kind, canon(f.labels), repr(f.data)) for f in graph.fix_sites]
    return members, blocked, constraints, fixes, sorted(graph.unreached), [(op, m) for op, m, _ in graph.unknown]


def measured_values(graph) -> list:
    """The graph's sinks (kind, labels, member, statistics) and output, comparable with ``==``."""

    def sink(s):
        if s is None:
            return None
        stats = tuple(tuple(t.reshape(-1).tolist()) for t in (s.absmax, s.vmin, s.vmax))
        return s.kind, tuple(s.labels.reshape(-1).tolist()), s.member, s.foldable, stats, sink(s.other)

    outputs = [tuple(t.reshape(-1).tolist()) for t in tree_leaves(graph.output) if isinstance(t, torch.Tensor)]
    return [[sink(s) for s in graph.sinks], outputs]


def assert_shapes_trace_exact(model: nn.Module, x) -> bool:
    """The shapes-only graph (what pruning builds) has the real trace's structure, and replaying its tape
    (what compaction does next) gives the real trace's graph, measured values included; returns whether the
    shapes-only trace was used (False: it fell back to a real trace)."""
    fast = build_graph(model, x, cover=True, values=False)
    torch.manual_seed(0)  # (a train-mode pass, for cover, may run dropout)
    replayed = build_graph(model, x, cover=True, trace=fast.trace)
    torch.manual_seed(0)
    real = build_graph(model, x, cover=True)
    assert not real.replayed and replayed.replayed == (not fast.measured)
    assert graph_structure(fast) == graph_structure(real) == graph_structure(replayed)
    assert measured_values(replayed) == measured_values(real)
    return not fast.measured


def run(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    return model(*x) if isinstance(x, tuple) else model(x)


def oracle(model: nn.Module, masks: dict, x, *, train: bool = False, atol: float = 1e-5,
           params: int | None = None) -> nn.Module:
    """Compact ``model`` and check it against the masked model: outputs (eval, and train when asked) and the
    parameter count (``params``, or by default the count group-consistent masks imply). Returns the masked
    reference."""
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    mode = model.training
    compact_(model, masks, example_inputs=x)
    assert model.training == mode and all(m.training == mode for m in model.modules())
    for mode in (False, True) if train else (False,):
        model.train(mode), ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(run(model, x), run(ref, x), rtol=1e-4, atol=atol)
    model.eval(), ref.eval()
    want = implied_param_count(ref, masks) if params is None else params
    assert sum(p.numel() for p in model.parameters()) == want
    return ref


def conv_bn(cin: int, cout: int, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a, self.b = conv_bn(8, 12), nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.c = nn.Sequential(conv_bn(8, 16, stride=2), nn.Conv2d(16, 16, 3, padding=1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b(self.a(x)))
        x = F.relu(self.down(x) + self.c(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Dense(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier outputs, through a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList([nn.Sequential(nn.BatchNorm2d(6 + 4 * i), nn.ReLU(), nn.Conv2d(6 + 4 * i, 4, 3,
                                                   padding=1)) for i in range(3)])
        self.head = nn.Conv2d(18, 3, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(torch.cat(features, 1)).mean((2, 3))


class SplitSteps(nn.Module):
    """Res2Net-style split with iterative steps: each split adds the previous step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = conv_bn(3, 16, 1)
        self.steps = nn.ModuleList([conv_bn(4, 4) for _ in range(3)])
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        parts = torch.split(self.inp(x), 4, dim=1)
        outs, y = [], None
        for i, step in enumerate(self.steps):
            y = step(parts[i] if y is None else parts[i] + y)
            outs.append(y)
        return self.out(torch.cat([*outs, parts[3]], 1)).flatten(1)


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: chunk in two halves, transform one, concatenate, shuffle channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = conv_bn(3, 8, 1)
        self.branch = nn.Sequential(conv_bn(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
                                    conv_bn(4, 4, 1))
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        a, b = self.inp(x).chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        a, b = y.chunk(2, dim=1)
        return self.out(F.channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)).flatten(1)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.PReLU(32),
                                  nn.Conv2d(32, 4, 1))

    def forward(self, x):
        return self.body(x).flatten(1)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.GroupNorm(3, 6), nn.GELU(),
                                  nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2), nn.InstanceNorm2d(4, affine=True),
                                  nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.body(x).flatten(1)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(3, 12)
        self.down, self.up = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.up(F.silu(self.down(F.adaptive_avg_pool2d(y, 1)))))  # sigmoid(0) = 0.5
        return self.out((y * gate).mean((2, 3)))


class Tokens(nn.Module):
    """A small vision transformer: patch conv, class token, position embedding, MHA blocks, LayerNorms."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "ln2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            }))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            h = blk["ln1"](x)
            x = x + blk["attn"](h, h, h, need_weights=False)[0]
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x)[:, 0])


class Recurrent(nn.Module):
    def __init__(self, kind: type = nn.LSTM) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = kind(8, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.fc(out[:, -1])


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: depthwise conv, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.mlp(self.ln(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = x + self.scale * y
        return self.head(x.mean((2, 3)))


class Conv1d3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2))
        self.c3 = nn.Sequential(nn.Conv3d(8, 6, 1), nn.BatchNorm3d(6), nn.ReLU())
        self.fc = nn.Linear(6 * 4, 2)

    def forward(self, x):
        y = self.c1(x)  # (B, 8, 4)
        y = self.c3(y[:, :, None, :, None])  # (B, 6, 1, 4, 1)
        return self.fc(y.flatten(1))
