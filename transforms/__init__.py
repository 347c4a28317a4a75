"""The pipeline's stages, one file each: source, decode, embed, sink."""
