"""Per-backbone request preparation for `runtime.pipeline.Pipeline`, one module per backbone, each a set of plain
functions of the request (no class, no state, no Pipeline):

    infer_task(image, video, reference_images) -> task     the task the given inputs ask for
    check(manifest, req) -> req                            the request, or a RuntimeInputError
    use_cfg(req) -> bool                                   whether the negative prompt runs as a second row
    planner_vision(req) -> (images | None, video | None)   what the planner sees
    prepare(ctx, req, planned) -> Prepared                 the denoise inputs, sample, schedule, finish state
    finish(ctx, req, latents, state) -> (frames, latents)  decoding (and any last latent fix-up)

``ctx`` is a `runtime.backbones.common.RequestContext`: the manifest and the request's own engine callables.
`BACKBONES` maps a manifest's `backbone` to its module; `backbone_module` looks one up."""

from __future__ import annotations

from types import MappingProxyType, ModuleType

from metacanvas_deploy.runtime.backbones import flux, sana, wan
from metacanvas_deploy.runtime.errors import BundleError

BACKBONES = MappingProxyType({"wan": wan, "flux": flux, "sana": sana})


def backbone_module(name: str) -> ModuleType:
    """The module serving a manifest's backbone ``name``; BundleError for a backbone this runtime does not know."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise BundleError(f"this bundle's backbone is {name!r}, which this runtime does not serve (it serves "
                          f"{', '.join(BACKBONES)}); use a runtime of the version that built the bundle, or "
                          "rebuild the bundle for one of those backbones") from None
