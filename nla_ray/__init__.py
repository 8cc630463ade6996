"""nla_ray: evaluate Natural Language Autoencoders (AV: vector -> text, AR: text -> vector) at scale on Ray.

Library layers, each in its own module:
  sources     where model weights come from (HF dir / hub id / packaged GGUF, dequantized once and cached)
  sidecar     the `nla_meta.yaml` contract, validated against the live tokenizer
  templates   AV/AR prompt construction and explanation parsing
  models      loading decoders (truncated backbones, text-only views of multimodal Gemma-3)
  av, ar      the two engines: inject+generate, template+last-token value head
  pairs       writing and loading NLA pair directories in the released layout
  extract     stage-0 activation sampling
  metrics     pure functions: NMSE, cos, Var, FVE, clustered CIs, nulls
  corpora     document sources (packaged BBC News, HF datasets, ad-hoc texts)
  pipeline    Ray Data actor pools; tune: Ray Tune sweeps
  placement   GPU memory per pool and where Ray may place the pools' actors (pure arithmetic)
  ray_auth    one line for a driver that lacks a token-auth cluster's Ray token
"""

__version__ = "0.1.0"
