"""Pieces shared by the family adapters: MLP variants, layer scale, position-dependent terms."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from captum_clsemb.adapters.base import LayerScale, LinearView, identity


def scale_or_identity(gamma: object) -> Callable[[Tensor], Tensor]:
    """A :class:`LayerScale` over a gain parameter, or identity when the block has none (None, 1.0)."""
    if isinstance(gamma, Tensor):
        return LayerScale(gamma)
    if gamma is None or (isinstance(gamma, (int, float)) and gamma == 1.0):
        return identity
    raise TypeError(f"unexpected layer scale {gamma!r}")


def timm_mlp_parts(mlp: nn.Module) -> dict[str, object] | None:
    r"""BlockParts fields for a timm ``Mlp``, ``SwiGLU`` or ``GluMlp``; None for any other MLP.

    Gated MLPs compute their key coefficients ``act(gate(x)) * signal(x)`` in ``mlp_in``;
    ``fc1`` is then the signal branch (the linear map the coefficients are linear in when the
    gate is held fixed), ``mlp_gate`` the gate multiplier ``act(gate(x))``, ``fc2`` holds the
    value vectors as for a plain MLP.
    """
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear):
        return dict(fc1=mlp.fc1, act=mlp.act, mlp_mid_norm=mlp.norm, fc2=mlp.fc2, mlp_in=None, mlp_gate=None)
    if type(mlp) is SwiGLU:

        def swiglu(x: Tensor) -> Tensor:
            return mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)

        def swiglu_gate(x: Tensor) -> Tensor:
            return mlp.act(mlp.fc1_g(x))

        return dict(
            fc1=mlp.fc1_x,
            act=mlp.act,
            mlp_mid_norm=mlp.norm,
            fc2=mlp.fc2,
            mlp_in=swiglu,
            mlp_gate=swiglu_gate,
        )
    if type(mlp) is GluMlp and isinstance(mlp.fc1, nn.Linear) and mlp.chunk_dim == -1:
        half = mlp.fc1.out_features // 2
        # gate_last: x1 * act(x2) (signal = first half); else act(x1) * x2 (signal = second half)
        rows = slice(0, half) if mlp.gate_last else slice(half, None)

        def glu(x: Tensor) -> Tensor:
            x1, x2 = mlp.fc1(x).chunk(2, dim=-1)
            return x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2

        def glu_gate(x: Tensor) -> Tensor:
            x1, x2 = mlp.fc1(x).chunk(2, dim=-1)
            return mlp.act(x2) if mlp.gate_last else mlp.act(x1)

        fc1 = mlp.fc1
        signal = LinearView(lambda: fc1.weight[rows], lambda: None if fc1.bias is None else fc1.bias[rows])
        return dict(
            fc1=signal, act=mlp.act, mlp_mid_norm=mlp.norm, fc2=mlp.fc2, mlp_in=glu, mlp_gate=glu_gate
        )
    return None


def gather_pair_bias(bias: Tensor, token_index: Tensor | None) -> Tensor:
    r"""A (1 or N, heads, T, T) attention-score bias restricted to the traced tokens.

    ``token_index`` (N, T') holds the model-order index of each traced token (None: the full
    sequence); the result is (N, heads, T', T') with the bias between each kept pair, so that
    dropped tokens leave the others' relative positions unchanged.
    """
    if token_index is None:
        return bias
    n, t = token_index.shape
    b = bias.expand(n, -1, -1, -1)
    heads = b.shape[1]
    rows = token_index[:, None, :, None].expand(n, heads, t, b.shape[-1])
    b = b.gather(2, rows)  # (N, heads, T', T)
    cols = token_index[:, None, None, :].expand(n, heads, t, t)
    return b.gather(3, cols)


class TimmModelParts:
    """The members every timm adapter reads the same way from the model (``self.model``): the
    patch embedding's geometry, the classifier head and the norms before and after pooling."""

    model: nn.Module

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    @property
    def in_chans(self) -> int:
        return self.model.patch_embed.proj.in_channels

    @property
    def head(self) -> nn.Linear:
        return self.model.head

    def pre_pool_norm(self, states: Tensor) -> Tensor:
        return self.model.norm(states)

    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        return self.model.fc_norm(pooled)
