"""Every registered model: shapes, gradients, modes, determinism, overfitting a batch,
ONNX parity and input validation. One small model per name is built once per module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.runtime.onnxruntime_graphs import ort_session
from pipeline.losses import compute_loss
from pipeline.models import accepted_kwargs, create_model, list_models, size_kwarg
from pipeline.models.export_wrappers import export_graph, graph_modules

VOCAB = 12
DIM = 64
SIZE = 64
NAMES = list_models()


def small_kwargs(name: str) -> dict:
    kwargs = {"vocab_size": VOCAB, size_kwarg(name): DIM, "image_backbone": "resnet18"}
    small = {"word_dim": 32, "text_hidden_dim": 32}
    kwargs.update({k: v for k, v in small.items() if k in accepted_kwargs(name)})
    return kwargs


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, **small_kwargs(name))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def triplets(batch: int = 8, text_len: int = 5, seed: int = 0, size: int = SIZE):
    """CSS-like batch: reference scenes, distinct texts, targets = reference + a coloured
    square at a per-pair place (all different)."""
    gen = torch.Generator().manual_seed(seed)
    refs = torch.randn(batch, 3, size, size, generator=gen) * 0.5
    targets = refs.clone()
    cell_h, cell_w = size // 2, size // 4
    for i in range(batch):
        y, x = divmod(i % 8, 4)
        top, left = y * cell_h + cell_h // 4, x * cell_w + cell_w // 4
        targets[i, i % 3, top : top + cell_h // 2, left : left + cell_w // 2] += 2.0
    tokens = torch.randint(2, VOCAB, (batch, text_len), generator=gen)
    tokens[:, 0] = torch.arange(batch) % (VOCAB - 2) + 2
    lengths = torch.randint(1, text_len + 1, (batch,), generator=gen)
    lengths[0] = text_len
    return refs, tokens, lengths, targets


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_unit_norm_and_reuse(models, name):
    model = models(name).eval()
    refs, tokens, lengths, targets = triplets(4)
    with torch.no_grad():
        out = model(refs, tokens, lengths, targets)
        dim = model.embed_dim  # CCNet: experts x DIM
        assert out["query"].shape == (4, dim) and out["target"].shape == (4, dim)
        for key in ("query", "target"):
            assert torch.isfinite(out[key]).all()
            assert torch.allclose(out[key].norm(dim=1), torch.ones(4), atol=1e-5)
        # a catalogue image's representation, computed once, composes the same query
        ref_repr = model.encode_image(refs)
        assert len(ref_repr) == len(model.image_repr_names)
        query = model.compose(ref_repr, model.encode_text(tokens, lengths))
        assert torch.allclose(query, out["query"], atol=1e-5)
        assert torch.allclose(
            model.embed_target(model.encode_image(targets)), out["target"], atol=1e-5
        )
        if model.has_correction:
            logits = out["correction_logits"]
            assert logits.shape == (4, 4) and torch.isfinite(logits).all()
            tgt_repr = model.encode_image(targets)
            diag = model.correct(ref_repr, tgt_repr, model.encode_text(tokens, lengths))
            assert diag.shape == (4,)
            assert torch.allclose(diag, logits.diagonal(), atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_gradient(models, name):
    model = models(name).train()
    model.zero_grad(set_to_none=True)
    # the soft triplet loss for the TIRG family, the classification loss for CCNet (as trained)
    loss_name = "batch_classification" if model.has_correction else "soft_triplet"
    loss, logs = compute_loss(model(*triplets(4)), loss_name)
    loss.backward()
    assert torch.isfinite(logs["loss"]).all()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no/NaN gradient for {missing}"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_train_uses_batch_statistics(models, name):
    model = models(name)
    batch = triplets(4)
    with torch.no_grad():
        model.eval()
        first, second = model(*batch), model(*batch)
        assert torch.equal(first["query"], second["query"])
        model.train()
        trained = model(*batch)
    model.eval()
    # batchnorm uses batch statistics in train mode (and dropout is active)
    assert not torch.allclose(trained["target"], first["target"], atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_builds_the_same_model(models, name):
    a, b = build(name, seed=3).eval(), build(name, seed=3).eval()
    batch = triplets(2)
    with torch.no_grad():
        assert torch.equal(a(*batch)["query"], b(*batch)["query"])
    other_seed = models(name)  # seed 0
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), other_seed.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_overfits_a_batch_of_eight_triplets(name):
    """25 Adam steps on one batch of 32 px images. The CNN trunk is frozen (and in eval
    mode) to fit the CPU budget: what is tested is that the encoders' heads, the text
    encoder and the composer can fit; gradients reaching the trunk are tested above."""
    model = build(name, seed=0)
    trunk = model.image_encoder.backbone
    trunk.requires_grad_(False)
    model.train()
    trunk.eval()
    batch = triplets(8, size=32)
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        loss, _ = compute_loss(model(*batch), "batch_classification")
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        out = model(*batch)
    recall_at_1 = float(
        ((out["query"] @ out["target"].T).argmax(1) == torch.arange(8)).float().mean()
    )
    assert losses[-1] < 0.5 * losses[0], losses
    assert recall_at_1 == 1.0, (recall_at_1, losses)


@pytest.mark.parametrize("name", NAMES)
def test_graphs_export_to_onnx_and_match_pytorch(models, name, tmp_path):
    pytest.importorskip("onnxruntime")
    model = models(name).eval()
    graphs = graph_modules(model, image_size=SIZE)
    expected = {"image_encoder", "composer", "target_head"}
    expected |= {"text_encoder"} if model.text_repr_names else set()
    expected |= {"correction"} if model.has_correction else set()
    assert set(graphs) == expected
    for graph_name, graph in graphs.items():
        path = export_graph(graph, tmp_path / f"{graph_name}.onnx")
        session = ort_session(path)
        assert [i.name for i in session.get_inputs()] == graph.input_names
        for batch, text_len in [(1, 3), (5, 7)]:
            inputs = graph.example_inputs(batch, text_len)
            with torch.no_grad():
                ref = graph.module(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = session.run(
                graph.output_names, {n: x.numpy() for n, x in zip(graph.input_names, inputs)}
            )
            for out_name, g, r in zip(graph.output_names, got, ref):
                assert g.shape == tuple(r.shape), (graph_name, out_name)
                np.testing.assert_allclose(
                    g, r.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{name}/{graph_name}/{out_name}"
                )


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(models, name):
    model = models(name).eval()
    refs, tokens, lengths, targets = triplets(2)
    cases = [
        ((refs[0], tokens, lengths, targets), "ref_images|images"),
        ((refs[:, :1], tokens, lengths, targets), "3 channels"),
        ((refs[:, :, :16, :16], tokens, lengths, targets), "at least 32"),
        ((refs, tokens.clamp(max=0) + VOCAB, lengths, targets), "tokens must be ids"),
        ((refs, tokens - 10, lengths, targets), "tokens must be ids"),
        ((refs, tokens, torch.zeros_like(lengths), targets), "lengths must be in"),
        ((refs, tokens, lengths + tokens.shape[1], targets), "lengths must be in"),
        ((refs, tokens.float(), lengths, targets), "integer"),
        ((refs, tokens[:1], lengths[:1], targets), "batch sizes"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)


def test_text_only_training_never_encodes_the_reference():
    """As in the TIRG code, the text-only baseline's training step runs the CNN on the
    targets alone: batch norm's running statistics (used for target embeddings at
    evaluation) are those of the targets, and the step costs a third less."""
    refs, tokens, lengths, targets = triplets(4)
    model, targets_only = build("text_only").train(), build("text_only").train()
    model(refs * 10 + 3, tokens, lengths, targets)
    targets_only.encode_image(targets)
    for key, value in targets_only.image_encoder.state_dict().items():
        torch.testing.assert_close(model.image_encoder.state_dict()[key], value, msg=key)
    model.eval()
    expected = torch.nn.functional.normalize(model.text_encoder(tokens, lengths), dim=1)
    torch.testing.assert_close(model(refs, tokens, lengths, targets)["query"], expected)
    with pytest.raises(ValueError, match="ref_images"):
        model(refs[:, :1], tokens, lengths, targets)


def test_value_checks_are_skipped_while_a_cuda_graph_captures(monkeypatch):
    """Reading token ids back is a host sync, which would invalidate a CUDA graph capture
    (the training step's, serving's query graphs): the value checks step aside then,
    the shape checks still run."""
    from pipeline.models import checks

    tokens, lengths = torch.full((2, 3), VOCAB + 5), torch.tensor([1, 9])
    with pytest.raises(ValueError, match="tokens must be ids"):
        checks.check_text(tokens, lengths, VOCAB)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    checks.check_text(tokens, lengths, VOCAB)  # values unread: no error, no sync
    with pytest.raises(ValueError, match="shape"):
        checks.check_text(tokens[0], lengths, VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwarg_is_named(name):
    with pytest.raises(TypeError, match="colour.*accepted: vocab_size"):
        create_model(name, vocab_size=VOCAB, colour="red")


def test_tirg_weights_init_and_freeze():
    model = create_model(
        "tirg", vocab_size=VOCAB, embed_dim=DIM, w_g_init=2.0, w_r_init=5.0, learn_weights=False
    )
    assert model.weights.w_g.item() == 2.0 and model.weights.w_r.item() == 5.0
    assert not model.weights.w_g.requires_grad and not model.weights.w_r.requires_grad


def test_ccnet_mutan_fusion_gets_gradients_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(
        "ccnet", fusion="mutan", mutan_rank=16, mutan_heads=2, **small_kwargs("ccnet")
    )
    loss, _ = compute_loss(model(*triplets(4)), "batch_classification")
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    graph = graph_modules(model.eval(), image_size=SIZE)["composer"]
    session = ort_session(export_graph(graph, tmp_path / "composer.onnx"))
    inputs = graph.example_inputs(3, 6)
    with torch.no_grad():
        expected = graph.module(*inputs).numpy()
    got = session.run(None, {n: x.numpy() for n, x in zip(graph.input_names, inputs)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_ccnet_loads_local_word_vectors(tmp_path):
    words = ["<pad>", "<unk>", "red", "blue"] + [f"w{i}" for i in range(VOCAB - 4)]
    glove = tmp_path / "glove.txt"
    glove.write_text("red " + " ".join(["0.5"] * 32) + "\nzebra " + " ".join(["1"] * 32) + "\n")
    model = create_model(
        "ccnet",
        word_vectors_path=str(glove),
        vocab_words=words,
        freeze_word_vectors=True,
        **small_kwargs("ccnet"),
    )
    table = model.text_encoder.embedding.weight
    assert torch.equal(table[2], torch.full((32,), 0.5)) and not table.requires_grad
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        create_model(
            "ccnet",
            word_vectors_path=str(tmp_path / "nowhere.txt"),
            vocab_words=words,
            **small_kwargs("ccnet"),
        )
    with pytest.raises(ValueError, match="vocab_words"):
        create_model("ccnet", word_vectors_path=str(glove), **small_kwargs("ccnet"))


def test_pretrained_weights_come_only_from_local_files(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    weights = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    model = create_model("tirg", pretrained_path=str(path), **small_kwargs("tirg"))
    assert torch.equal(model.image_encoder.backbone.stem[0].weight, weights["conv1.weight"])
    assert torch.equal(
        model.image_encoder.backbone.head[0].conv1.weight, weights["layer4.0.conv1.weight"]
    )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_model("tirg", pretrained_path=str(tmp_path / "missing.pth"), **small_kwargs("tirg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/resnet18-f37072fd\.pth"):
        create_model("tirg", pretrained_path="torch_hub", **small_kwargs("tirg"))


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="image_backbone must be one of.*vgg"):
        create_model("tirg", vocab_size=VOCAB, image_backbone="vgg")
