"""The model core (torch): spec, ViT, learngene, expansion, Aux-Net, extraction, TLEG import."""
