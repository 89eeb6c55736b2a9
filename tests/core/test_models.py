from __future__ import annotations

import pytest
import torch

from mrprism_core.models import build_model, split_state
from mrprism_core.models.confidence import ConfidenceEmbedding


def _mrprism(raters: int, **options):
    return build_model(
        "mrprism",
        in_channels=3,
        num_classes=2,
        num_raters=raters,
        image_size=32,
        preset="tiny",
        **options,
    )


def test_confidence_embedding_shapes_do_not_depend_on_rater_count():
    small, large = ConfidenceEmbedding(2, 3, 8), ConfidenceEmbedding(2, 7, 8)
    shared = lambda m: {k: v.shape for k, v in m.state_dict().items() if "rater_identity" not in k}  # noqa: E731
    assert shared(small) == shared(large)
    for module, raters in ((small, 3), (large, 7)):
        pyramid = module(torch.rand(2, raters, 2, 32, 32))
        assert [p.shape[-1] for p in pyramid] == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="7 confidence maps"):
        small(torch.rand(1, 7, 2, 32, 32))


def test_mrprism_output_is_probabilities_with_every_recurrence(tiny_mrprism, tiny_batch):
    tiny_mrprism.eval()
    with torch.no_grad():
        out = tiny_mrprism(tiny_batch["image"])
    assert out.calibrated.shape == (4, 2, 32, 32)
    assert out.raters.shape == (4, 3, 2, 32, 32)
    assert len(out.recurrences) == tiny_mrprism.arch.recurrences + 1
    assert out.recurrences[-1] is out.calibrated
    for tensor in (out.calibrated, out.raters):
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    # inference starts from equal confidences: deterministic
    with torch.no_grad():
        again = tiny_mrprism(tiny_batch["image"])
    assert torch.equal(out.calibrated, again.calibrated)
    # the recurrences really feed DivP's output back: successive maps differ
    assert not torch.equal(out.recurrences[0], out.recurrences[1])


def test_split_state_is_disjoint_complete_and_identical_across_rater_counts():
    models = {m: _mrprism(m) for m in (3, 4, 5, 7)}
    shapes = {}
    for raters, model in models.items():
        shared, local = split_state(model)
        full = model.state_dict()
        assert set(shared).isdisjoint(local)
        assert set(shared) | set(local) == set(full)
        assert all(k.startswith(("divp.heads.", "confidence.rater_identity.")) for k in local)
        assert local["confidence.rater_identity.weight"].shape[0] == raters
        shapes[raters] = {k: tuple(v.shape) for k, v in shared.items()}
    assert shapes[3] == shapes[4] == shapes[5] == shapes[7]


def test_split_state_ablation_and_bad_names():
    shared, local = split_state(_mrprism(3, local_modules=["divp", "confidence.rater_identity"]))
    assert not any(k.startswith("divp.") for k in shared)
    assert any(k.startswith("divp.trunk.") for k in local)
    with pytest.raises(ValueError, match="not found"):
        split_state(_mrprism(3), local_modules=["decoder"])


def test_local_norms_keep_every_normalisation_layer_at_the_site():
    plain, norms = _mrprism(3), _mrprism(3, local_norms=True)
    norm_params = {
        f"{name}.{p}"
        for name, module in norms.named_modules()
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for p, _ in module.named_parameters()
    }
    assert len(norm_params) > 40  # encoder, ConP and DivP all normalise
    shared, local = split_state(norms)
    assert norm_params <= set(local) and norm_params.isdisjoint(shared)
    # nothing else moved: the rest of the split is the model's default one
    plain_shared, plain_local = split_state(plain)
    assert set(local) - norm_params == set(plain_local) - norm_params
    assert set(shared) == set(plain_shared) - norm_params
    # every model takes the option (D-Persona's heads stay local, its norms join them)
    dpersona = build_model(
        "dpersona", in_channels=3, num_classes=2, num_raters=3, image_size=32, local_norms=True
    )
    _, local = split_state(dpersona)
    assert "projection_heads" in dpersona.local_modules
    assert "backbone.encoder.stem.1.weight" in local


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mrnett", in_channels=1, num_classes=1, num_raters=2, image_size=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("mrprism", in_channels=1, num_classes=1, num_raters=2, image_size=40)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model(
            "mrprism", in_channels=1, num_classes=1, num_raters=2, image_size=32, preset="huge"
        )
    with pytest.raises(ValueError, match=r"model 'mrprism' has no option\(s\) \['depth'\]"):
        build_model("mrprism", in_channels=1, num_classes=1, num_raters=2, image_size=32, depth=3)


def test_model_options_are_checked_per_model_before_building():
    from mrprism_core.models import check_model_options

    # MrPrism's loss option and an architecture field are MrPrism's; D-Persona takes the
    # architecture field and its own bank size but not MrPrism's rater-term weight
    assert check_model_options("mrprism", "tiny", {"zeta": 0.1, "recurrences": 2}).recurrences == 2
    assert check_model_options("dpersona", "tiny", {"bank_size": 4, "recurrences": 2})
    with pytest.raises(ValueError, match=r"model 'dpersona' has no option\(s\) \['zeta'\]"):
        check_model_options("dpersona", "tiny", {"zeta": 0.1, "recurrences": 2})
    with pytest.raises(ValueError, match="bank_size"):  # the message lists the model's own
        check_model_options("dpersona", "tiny", {"divp_supervision": "shuffle"})


def test_loss_rejects_wrong_rater_count(tiny_mrprism, tiny_batch):
    batch = dict(tiny_batch, raters=tiny_batch["raters"][:, :2])
    with pytest.raises(ValueError, match=r"\(B, 3, K, H, W\)"):
        tiny_mrprism.loss(batch)


def test_unet_baseline_shapes(tiny_batch):
    model = build_model("unet_mv", in_channels=3, num_classes=2, num_raters=3, image_size=32)
    out = model(tiny_batch["image"])
    assert out.calibrated.shape == (4, 2, 32, 32) and out.raters is None
    loss, parts = model.loss(tiny_batch)
    assert loss.item() > 0 and "bce_dice" in parts


def test_memory_saving_backward_gives_the_same_gradients_as_the_plain_loss(
    tiny_mrprism, tiny_batch
):
    tiny_mrprism.train()
    torch.manual_seed(5)
    loss, _ = tiny_mrprism.loss(tiny_batch)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in tiny_mrprism.named_parameters() if p.grad is not None}
    tiny_mrprism.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    value, _ = tiny_mrprism.backward(tiny_batch)
    assert value.item() == pytest.approx(loss.item(), rel=1e-5)
    streamed = {n: p.grad for n, p in tiny_mrprism.named_parameters() if p.grad is not None}
    assert plain.keys() == streamed.keys()
    assert any(n.startswith("encoder.") for n in plain)  # the encoder really gets gradients
    for name in plain:
        assert torch.allclose(plain[name], streamed[name], rtol=1e-4, atol=1e-6), name


def test_conp_reads_two_or_four_likelihood_maps_per_rater_and_class():
    whole, short = _mrprism(3), _mrprism(3, conp_whole_likelihood=False)
    assert whole.confidence.embed.in_channels == 4 * 2  # K = 2 classes
    assert short.confidence.embed.in_channels == 2 * 2
    with torch.no_grad():
        out = short(torch.rand(1, 3, 32, 32))
    assert out.calibrated.shape == (1, 2, 32, 32)
