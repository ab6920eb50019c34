"""Subclasses of MONAI's diffusion UNet pieces that TorchScript can compile, and a scriptable copy of a network."""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets import diffusion_model_unet as _dmu

__all__ = ["scriptable_copy"]


class _ScriptableSpatialAttentionBlock(SpatialAttentionBlock):
    """MONAI's ``SpatialAttentionBlock`` with the same computation written so TorchScript compiles it (MONAI's
    ``reshape(*shape[:2], -1)`` unpacks a size of unknown length)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        shape = x.shape
        x = self.norm(x)
        x = x.reshape(shape[0], shape[1], -1).transpose(1, 2)  # "b c h w d -> b (h w d) c"
        x = self.attn(x)
        x = x.transpose(1, 2).reshape(shape)  # "b (h w d) c -> b c h w d"
        return x + residual


class _ScriptableWrappedUpsample(_dmu.WrappedUpsample):
    """MONAI's ``WrappedUpsample`` (an ``nn.Sequential``) without the ``super().forward`` TorchScript rejects."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


class _ScriptableDiffusionModelUNet(_dmu.DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet.forward`` without the ControlNet residual arguments, whose
    ``tuple[torch.Tensor]`` zip TorchScript cannot compile; otherwise the same operations in the same order."""

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.time_embed(_dmu.get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(dtype=x.dtype)
        h = self.conv_in(x)
        if context is not None and self.with_conditioning is False:
            raise ValueError("model should have with_conditioning = True if context is provided")
        down_block_res_samples: list[torch.Tensor] = [h]
        for downsample_block in self.down_blocks:
            h, res_samples = downsample_block(hidden_states=h, temb=emb, context=context)
            for residual in res_samples:
                down_block_res_samples.append(residual)
        h = self.middle_block(hidden_states=h, temb=emb, context=context)
        for upsample_block in self.up_blocks:
            idx: int = -len(upsample_block.resnets)
            res_samples = down_block_res_samples[idx:]
            down_block_res_samples = down_block_res_samples[:idx]
            h = upsample_block(hidden_states=h, res_hidden_states_list=res_samples, temb=emb, context=context)
        return self.out(h)


#: MONAI classes whose ``forward`` TorchScript cannot compile -> subclasses with the same computation that it can
_SCRIPTABLE = {
    _dmu.DiffusionModelUNet: _ScriptableDiffusionModelUNet,
    _dmu.WrappedUpsample: _ScriptableWrappedUpsample,
    SpatialAttentionBlock: _ScriptableSpatialAttentionBlock,
}


def scriptable_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` in which every MONAI UNet piece that TorchScript cannot compile is replaced by its
    subclass above (same parameters, same computation); ``module`` itself is left as it is. Networks return this
    from ``__prepare_scriptable__``, which ``torch.jit.script`` calls on the module it is given (not on submodules)."""
    scriptable = copy.deepcopy(module)
    for sub in scriptable.modules():
        if type(sub) in _SCRIPTABLE:
            sub.__class__ = _SCRIPTABLE[type(sub)]
    return scriptable
