"""Weight decay goes by the kind of layer a parameter belongs to: only linear and convolution weights get it."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from torch import nn

from genie.models.dynamics import DynamicsConfig, DynamicsModel
from genie.models.lam import LAMConfig
from genie.models.tokenizer import TokenizerConfig
from genie.stages.base import StageModule, param_decay
from genie.stages.lam import LAMStage
from genie.stages.tokenizer import TokenizerStage

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# the ST-transformer shape both tiny stages share
TINY = dict(image_size=16, patch_size=4, num_frames=3, width=32, encoder_depth=1, decoder_depth=1, num_heads=2)


def tiny_lam() -> LAMStage:
    return LAMStage(model=LAMConfig(**TINY, mlp_ratio=2.0, code_dim=8, num_actions=4))


def tiny_tokenizer() -> TokenizerStage:
    return TokenizerStage(model=TokenizerConfig(**TINY, mlp_ratio=2.0, code_dim=8, num_codes=16))


def optimizer_groups(stage: StageModule) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) parameters by name, as configure_optimizers groups them after setup."""
    stage.trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    stage.setup("fit")
    opt = stage.configure_optimizers()["optimizer"]
    decay_group, no_decay_group = opt.param_groups
    assert decay_group["weight_decay"] == stage.optim.weight_decay and no_decay_group["weight_decay"] == 0.0
    names = {id(p): n for n, p in stage.named_parameters()}
    return (
        {names[id(p)]: p for p in decay_group["params"]},
        {names[id(p)]: p for p in no_decay_group["params"]},
    )


def layer_weights(module: nn.Module) -> set[str]:
    """Names of the weights of every linear / convolution layer in ``module``."""
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, LAYERS)}


@pytest.mark.parametrize("build", [tiny_lam, tiny_tokenizer], ids=["lam", "tokenizer"])
def test_decay_group_is_exactly_the_linear_and_conv_weights(build):
    stage = build()
    decay, no_decay = optimizer_groups(stage)
    assert set(decay) == layer_weights(stage)
    assert set(decay) | set(no_decay) == {n for n, p in stage.named_parameters() if p.requires_grad}
    assert all(not n.endswith(".bias") for n in decay)


def test_names_do_not_decide():
    """'embed' in a name no longer exempts a layer; a parameter of its own is exempt whatever its shape."""
    lam = tiny_lam()
    lam_decay, lam_no_decay = optimizer_groups(lam)
    assert "net.encoder_embed.conv.weight" in lam_decay  # a Conv2d patch embedding: decayed
    assert "net.action_token_D" in lam_no_decay  # nn.Parameter set on the model itself
    for name in ("net.encoder.pos_spatial_ND", "net.quantizer.codebook_VZ"):  # 2-D, still not decayed
        assert lam.get_parameter(name).ndim == 2 and name in lam_no_decay
    assert any(n.endswith("norm_mlp.weight") for n in lam_no_decay)  # LayerNorm
    assert any(n.endswith("q_norm.weight") for n in lam_no_decay)  # RMSNorm of the queries
    tok_decay, _ = optimizer_groups(tiny_tokenizer())
    assert "net.patch_embed.weight" in tok_decay  # an nn.Linear named "embed": decayed


def test_embedding_tables_are_not_decayed():
    model = DynamicsModel(
        DynamicsConfig(num_codes=16, grid_size=4, num_actions=4, num_frames=3, width=32, depth=1, num_heads=2)
    )
    decays = param_decay(model)
    assert decays["token_embed.weight"] is False and decays["action_embed.weight"] is False  # nn.Embedding
    assert decays["neighbours.weight"] is True and decays["neighbours.bias"] is False  # Conv2d
    assert decays["head.weight"] is True and decays["transformer.pos_spatial_ND"] is False
    assert {n for n, d in decays.items() if d} == layer_weights(model)


def test_decisions_survive_wrapper_prefixes():
    """Under FSDP the names gain wrapper levels after setup: the decisions made in setup still apply."""

    class Wrapped(nn.Module):  # what FSDP / activation checkpointing put between a module and its parent
        def __init__(self, inner: nn.Module):
            super().__init__()
            self._fsdp_wrapped_module = inner

    stage = tiny_lam()
    stage.trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    expected = {id(stage.get_parameter(n)) for n in layer_weights(stage)}
    stage.setup("fit")
    stage.net.encoder = Wrapped(stage.net.encoder)
    decay_group, _ = stage.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in decay_group["params"]} == expected
    assert any("_fsdp_wrapped_module" in n for n, _ in stage.named_parameters())
