"""int8 quantisation of an exported graph: smoothing, MatMulNBits/QMoE, the residual pass,
and the int8-vs-fp32 fidelity check (``moechat export --int8``)."""
