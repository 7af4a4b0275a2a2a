"""Graph patterns from models written outside the zoo, adapters and whole attention heads."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from graph_patterns import PATTERNS, Attention, Tokens, TransformerNet
from torch import nn

import compressor as cz
from compressor.models.checkpoints import load_checkpoint, save_checkpoint
from compressor.models.self_attention import SelfAttention
from compressor.pruning.engine import make_plan, prune
from compressor.pruning.plan import group_slices, planned_group
from compressor.runtime.export import export_onnx
from compressor.runtime.measure import count_params_macs

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from zoo import AGREEMENT, check_model

PRUNE = cz.StructuredPruning(ratio=0.5, round_to=None)
# split sizes written as constants in forward: torch-pruning's mapping cannot hold, so the
# split's producer is left whole (and said); everything else is pruned
LEFT_WHOLE = {"split": "stem.0"}  # and branch.0.0, whose input it is


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_is_pruned_and_its_int8_file_agrees_with_fp32(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = PATTERNS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = check_model(model, name, 32, threads=2, latency=False)
    assert row["status"] == "pass", row.get("reason")
    assert row["macs_after"] < row["macs_before"], "MACs did not fall"
    agreement = row["int8_vs_fp32"]
    assert agreement["top1_agreement"] >= AGREEMENT["top1_agreement"]
    assert agreement["cosine"] >= AGREEMENT["cosine"]
    if name in LEFT_WHOLE:
        assert LEFT_WHOLE[name] in row["left_whole"]
        assert row["notes"] and "left whole" in row["notes"][0]


def _zero_planned(model, example, options):
    """Set the channels the plan removes to zero (producers and norm scales)."""
    plan, pruner, _ = make_plan(model, example, options)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for planned in plan.groups:
            group = planned_group(pruner.DG, modules[planned.root], planned)
            for select in ("outputs", "norms"):
                for p, dim, idxs, _ in group_slices(pruner.DG, group, select=select):
                    p.index_fill_(dim, idxs, 0.0)
    return plan


EXACT = ["chunk", "grouped_conv", "group_norm", "channel_shuffle", "squeeze_excite"]
EXACT += ["upsample_skip", "called_twice"]


@pytest.mark.parametrize("name", EXACT)
def test_pruning_keeps_what_the_kept_channels_compute(name):
    """With the removed channels zeroed first, the pruned model computes the same outputs:
    the channel indices were mapped right through chunks, groups, shuffles, gates."""
    torch.manual_seed(0)
    model = PATTERNS[name]().eval()
    x = torch.randn(4, 3, 32, 32)
    plan = _zero_planned(model, x[:1], PRUNE)
    assert plan.removed_channels > 0
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, _ = prune(copy.deepcopy(model), x[:1], PRUNE)
    assert count_params_macs(pruned, x[:1])[1] < count_params_macs(model, x[:1])[1]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


def test_grouped_convs_and_group_norms_lose_whole_groups():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    pruned, _ = prune(PATTERNS["grouped_conv"]().eval(), x, PRUNE)
    for conv in (pruned.grouped[0], pruned.mix[0]):
        assert conv.groups == 4 and conv.out_channels % 4 == 0 and conv.out_channels < 64
    pruned, _ = prune(PATTERNS["group_norm"]().eval(), x, PRUNE)
    for norm, width in ((pruned.n1, 32), (pruned.n2, 64)):
        assert norm.num_channels < width
        assert norm.num_channels // norm.num_groups == width // 8  # group size unchanged


class SoloAttention(nn.Module):
    """Only timm-style attention on tokens: its heads are the one prunable group."""

    def __init__(self):
        super().__init__()
        self.attn = Attention(64, 4)

    def forward(self, x):
        return self.attn(x)


def test_whole_heads_are_removed_and_the_kept_heads_compute_the_same():
    torch.manual_seed(0)
    model = SoloAttention().eval()
    x = torch.randn(2, 16, 64)
    options = cz.StructuredPruning(ratio=0.5, round_to=None, global_pruning=False)
    plan = _zero_planned(model, x[:1], options)
    assert [g.removed_heads for g in plan.groups] == [2]
    with torch.no_grad():
        expected = model(x)
    pruned, details = prune(copy.deepcopy(model), x[:1], options)
    assert pruned.attn.num_heads == 2 and pruned.attn.head_dim == 16
    assert details["pruning"]["attention_heads"]["heads_after"] == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)


def test_head_dims_mode_keeps_every_head():
    x = torch.randn(1, 16, 64)
    options = cz.StructuredPruning(
        ratio=0.5, round_to=None, global_pruning=False, attention_heads="dims"
    )
    pruned, _ = prune(SoloAttention().eval(), x, options)
    assert pruned.attn.num_heads == 4 and pruned.attn.head_dim == 8
    assert pruned(x).shape == (1, 16, 64)


@pytest.mark.parametrize("name", ["multihead_attention", "transformer_encoder_layer"])
def test_multihead_attention_loses_whole_heads(name):
    """Self-attention is restructured so heads go by their own scores, not the residual's."""
    x = torch.randn(1, 3, 32, 32)
    options = cz.StructuredPruning(ratio=0.5, round_to=None, global_pruning=False)
    pruned, details = prune(PATTERNS[name]().eval(), x, options)
    assert not [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    layers = [m for m in pruned.modules() if isinstance(m, SelfAttention)]
    assert layers and all(m.num_heads == 2 and m.head_dim == 16 for m in layers)
    assert details["pruning"]["restructured"] == {"multihead_attention": len(layers)}
    assert details["pruning"]["adapters"]["qkv_attention"] == len(layers)
    assert all(m.embed_dim == pruned.patch.out_channels == 32 for m in layers)


CALLS = {
    "plain": {},
    "key padding": {"key_padding_mask": torch.tensor([[False] * 6 + [True] * 2] * 2)},
    "bool mask": {"attn_mask": torch.ones(8, 8, dtype=torch.bool).triu(1)},
    "float mask per head": {"attn_mask": torch.randn(8, 8, 8), "average_attn_weights": False},
    "causal": {"attn_mask": torch.ones(8, 8, dtype=torch.bool).triu(1), "is_causal": True},
    "no weights": {"need_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", list(CALLS))
def test_self_attention_computes_what_multihead_attention_computes(call, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    mine = SelfAttention.from_multihead(mha).eval()
    x = torch.randn(2, 8, 32) if batch_first else torch.randn(8, 2, 32)
    other = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    single = torch.randn(8, 32)
    with torch.no_grad():
        for args in ((x, x, x), (x, other, other), (single, single, single)):
            if args[0].dim() == 2 and call in ("key padding", "float mask per head"):
                continue  # those masks are for batched calls
            if args[1] is other and call != "plain":
                continue
            expected, got = mha(*args, **CALLS[call]), mine(*args, **CALLS[call])
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
            if expected[1] is None:
                assert got[1] is None
            else:
                torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


class CrossAttentionNet(Tokens):
    """Tokens attend to a learned memory: key and value are not the query."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = nn.Parameter(torch.randn(1, 6, 64))
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def encode(self, x):
        memory = self.memory.expand(x.shape[0], -1, -1)
        return x + self.attn(x, memory, memory, need_weights=False)[0]


def test_cross_attention_keeps_its_module_and_still_loses_whole_heads():
    x = torch.randn(1, 3, 32, 32)
    options = cz.StructuredPruning(ratio=0.5, round_to=None, global_pruning=False)
    pruned, details = prune(CrossAttentionNet().eval(), x, options)
    assert details["pruning"]["restructured"] == {}
    assert isinstance(pruned.attn, nn.MultiheadAttention)
    assert pruned.attn.num_heads == 2 and pruned.attn.head_dim == 16
    assert pruned(x).shape == (1, 10)


def test_a_restructured_encoder_runs_without_nested_tensors():
    """torch's encoder would pack padded batches into nested tensors for its fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()  # nested tensors on by default
    tokens = torch.randn(2, 6, 32)
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        expected = encoder(tokens, src_key_padding_mask=padding)
        cz.adapters.restructure(encoder, tokens)
        assert isinstance(encoder.layers[0].self_attn, SelfAttention)
        assert encoder.use_nested_tensor is False
        got = encoder(tokens, src_key_padding_mask=padding)
    kept = ~padding  # torch's fast path writes zeros at padded positions
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-5)


class OddAttention(nn.Module):
    """Attention with names no built-in adapter knows: ``to_qkv`` and ``heads``."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class OddNet(Tokens):
    def __init__(self):
        super().__init__()
        self.attn = OddAttention()

    def encode(self, x):
        return x + self.attn(x)


def test_a_registered_adapter_tells_pruning_where_the_heads_are():
    x = torch.randn(1, 3, 32, 32)
    options = cz.StructuredPruning(ratio=0.5, round_to=None, global_pruning=False)
    adapter = cz.Adapter(
        "odd_attention",
        matches=cz.class_named(f"{OddAttention.__module__}.OddAttention"),
        attention=lambda m: cz.Attention(layer=m.to_qkv, heads=m.heads),
        set_heads=lambda m, n: setattr(m, "heads", n),
    )
    cz.register_adapter(adapter)
    try:
        with pytest.raises(ValueError, match="already registered"):
            cz.register_adapter(adapter)
        assert cz.adapters.adapter_for(OddAttention()) is adapter
        pruned, details = prune(OddNet().eval(), x, options)
    finally:
        cz.adapters.unregister_adapter("odd_attention")
    assert details["pruning"]["adapters"] == {"odd_attention": 1}
    assert pruned.attn.heads == 2 and pruned.attn.to_qkv.out_features == 96
    assert pruned(x).shape == (1, 10)


def test_a_frozen_transformer_exports(tmp_path):
    """Without grads, eval mode takes the attention fast path the exporter cannot export."""
    model = TransformerNet().eval().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    parity = export_onnx(model, x[:1], tmp_path / "m.onnx", check_inputs=x)
    assert parity.max_abs_diff <= parity.tolerance
    assert torch.backends.mha.get_fastpath_enabled()  # put back as it was


def test_a_pruned_vit_loads_back_from_its_checkpoint(tmp_path):
    from test_zoo import tiny

    torch.manual_seed(0)
    template = tiny("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    options = cz.StructuredPruning(ratio=0.3, round_to=None, global_pruning=False)
    pruned, _ = prune(copy.deepcopy(template), x[:1], options)
    assert pruned.hidden_dim < template.hidden_dim
    save_checkpoint(tmp_path / "c.pt", pruned, step="structured_pruning", stage={}, extra={})
    loaded, _ = load_checkpoint(tmp_path / "c.pt", template)
    assert loaded.hidden_dim == pruned.hidden_dim
    assert loaded.encoder.layers[0].self_attention.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


def test_a_torch_stage_after_int8_is_refused():
    with pytest.raises(cz.RecipeError, match="put 'structured_pruning' before 'int8_quant"):
        cz.Pipeline([cz.Int8Quantization(), cz.StructuredPruning()])
    with pytest.raises(cz.RecipeError, match="after 'int8_quantization'"):
        cz.Pipeline.from_recipe({"stages": [{"int8_quantization": {}}, {"distillation": {}}]})


def test_a_timm_vit_loses_whole_heads_through_the_generic_adapter(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8
    )
    x = torch.randn(1, 3, 32, 32)
    options = cz.StructuredPruning(ratio=0.5, round_to=None, global_pruning=False)
    pruned, details = prune(copy.deepcopy(model).eval(), x, options)
    attn = pruned.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 64  # 3 heads of 64 -> 2
    assert attn.qkv.out_features == 3 * 2 * 64 and attn.proj.in_features == 128
    assert details["pruning"]["adapters"]["qkv_attention"] == 12
    row = check_model(model, "vit_tiny", 32, threads=2, latency=False)
    assert row["status"] == "pass", row.get("reason")


def test_a_pruned_maxvit_loads_back_from_its_checkpoint(tmp_path):
    from test_zoo import tiny

    torch.manual_seed(0)
    template = tiny("maxvit").eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, details = prune(copy.deepcopy(template), x[:1], cz.StructuredPruning(ratio=0.5))
    assert sum(r["heads_removed"] for r in details["pruning"]["pruned_inside"].values()) > 0
    save_checkpoint(tmp_path / "c.pt", pruned, step="structured_pruning", stage={}, extra={})
    loaded, _ = load_checkpoint(tmp_path / "c.pt", template)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))


@pytest.mark.parametrize(("name", "root"), [("channel_shuffle", "g1.0"), ("split", "stem.0")])
def test_sparsity_training_spares_the_groups_pruning_would_keep(name, root):
    """The groups the check leaves whole are found up front, so no channel of theirs is
    driven to zero only to be kept."""
    from compressor.pruning.engine import failing_groups

    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert failing_groups(PATTERNS[name]().eval(), x, PRUNE) == {root}
        assert failing_groups(PATTERNS["chunk"]().eval(), x, PRUNE) == set()


@pytest.mark.parametrize("name", ["swin", "swin_v2", "maxvit"])
def test_window_attention_loses_whole_heads_and_the_kept_heads_compute_the_same(name):
    """Inside blocks torch-pruning cannot trace, their adapters remove whole heads; heads
    zeroed beforehand are the ones that go, and the block's output does not change."""
    from test_zoo import tiny

    torch.manual_seed(0)
    model = tiny(name).eval()
    name_, block = next(
        (n, m)
        for n, m in model.named_modules()
        if (a := cz.adapters.adapter_for(m)) and a.prune_inside
    )
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    qkv, out = (block.qkv, block.proj) if hasattr(block, "qkv") else (block.to_qkv, block.merge)
    heads = block.num_heads if hasattr(block, "num_heads") else block.n_heads
    size = qkv.out_features // (3 * heads)
    with torch.no_grad():  # zero the last head everywhere it has weights
        for part in range(3):
            rows = slice(
                part * heads * size + (heads - 1) * size, part * heads * size + heads * size
            )
            qkv.weight[rows] = 0
            if qkv.bias is not None:
                qkv.bias[rows] = 0
        out.weight[:, (heads - 1) * size :] = 0
        expected = block(seen[0])
    result = cz.adapters.adapter_for(block).prune_inside(block, 0.3)
    assert result == {"heads_removed": 1}, name_
    assert qkv.out_features == 3 * (heads - 1) * size
    with torch.no_grad():
        torch.testing.assert_close(block(seen[0]), expected, rtol=1e-4, atol=1e-5)
