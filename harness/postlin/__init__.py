"""Post-linearization: a pretrained softmax causal LM converted into linear attention built from
any registered feature map, norm and gate (hybrids keep chosen layers softmax), ready to continue
training with the harness's own loop."""
