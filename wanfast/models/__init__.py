"""Plain eager modules with the official checkpoint key names: the DiT, the two VAEs, the text encoder."""


def vae_class(cfg) -> type:
    """The VAE module for a VAE config: ``WanVAE`` (Wan2.1) or ``Wan22VAE`` (Wan2.2, ``cfg.kind``)."""
    if getattr(cfg, "kind", "wan2.1") == "wan2.2":
        from wanfast.models.vae22 import Wan22VAE

        return Wan22VAE
    from wanfast.models.vae import WanVAE

    return WanVAE
