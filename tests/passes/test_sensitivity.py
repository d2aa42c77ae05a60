import torch
import torch.nn.functional as F
from torch import nn

from fp8compile.config import Rule
from fp8compile.passes import META
from tests.models import LlamaBlock, TinyLM


def _tags(gm):
    out = {}
    for n in gm.graph.nodes:
        m = n.meta.get(META, {})
        if "sensitive" in m:
            out.setdefault(m["sensitive"], []).append((n, m.get("module", "")))
    return out


def test_llama_block_with_explicit_softmax(passes):
    gm, _, _ = passes(LlamaBlock(sdpa=False), torch.randn(2, 8, 256), rewrite=False)
    tags = _tags(gm)
    assert {m for _, m in tags[Rule.NORM]} == {"attn_norm", "mlp_norm"}
    assert len(tags[Rule.SOFTMAX]) == 1
    assert len(tags[Rule.RESIDUAL]) == 2
    (scores,) = tags[Rule.SOFTMAX_INPUT]
    (pv,) = tags[Rule.SOFTMAX_OUTPUT]
    assert scores[0].meta[META]["gemm"] == pv[0].meta[META]["gemm"] == "matmul"
    protected = {m for nodes in tags.values() for _, m in nodes}
    assert not protected & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}


def test_sdpa_projections_are_not_softmax_inputs(passes):
    gm, _, _ = passes(LlamaBlock(sdpa=True), torch.randn(2, 8, 256), rewrite=False)
    tags = _tags(gm)
    assert Rule.SOFTMAX_INPUT not in tags and Rule.SOFTMAX_OUTPUT not in tags
    assert tags[Rule.SOFTMAX][0][0].target is F.scaled_dot_product_attention


def test_lm_embedding_and_head(passes):
    gm, _, _ = passes(TinyLM(), torch.randint(0, 512, (2, 8)), rewrite=False)
    tags = _tags(gm)
    assert [m for _, m in tags[Rule.EMBEDDING]] == ["embed"]
    assert [m for _, m in tags[Rule.OUTPUT_HEAD]] == ["lm_head"]


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(256, 256)
        self.proj = nn.Linear(256, 256)
        self.head = nn.Linear(256, 256)

    def forward(self, x, target):
        w = torch.softmax(self.gate(x) / 2, dim=-1)
        h = self.proj(x) * w
        return F.cross_entropy(self.head(h).float(), target)


def test_router_and_loss(passes):
    gm, _, _ = passes(Router(), torch.randn(8, 256), torch.randint(0, 256, (8,)),
                      rewrite=False)
    tags = _tags(gm)
    assert [m for _, m in tags[Rule.SOFTMAX_INPUT]] == ["gate"]
    assert [m for _, m in tags[Rule.OUTPUT_HEAD]] == ["head"], "head found through the loss"
    assert len(tags[Rule.LOSS]) == 1


def test_rules_can_be_switched_off(passes):
    rules = [r.value for r in Rule if r is not Rule.OUTPUT_HEAD]
    gm, _, _ = passes(TinyLM(), torch.randint(0, 512, (2, 8)), config={"rules": rules},
                      rewrite=False)
    assert Rule.OUTPUT_HEAD not in _tags(gm)


def test_hf_norm_modules_are_recognised_by_class(passes):
    from tests.models import tiny_hf_llama

    gm, _, _ = passes(tiny_hf_llama(), torch.randint(0, 512, (1, 8)), rewrite=False)
    norm_types = {n.meta[META]["module_type"] for n, _ in _tags(gm)[Rule.NORM]}
    assert norm_types == {"LlamaRMSNorm"}
