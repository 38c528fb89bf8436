"""Serving compressed directories with inference engines (vLLM), without densifying the factors.

`layout` is pure Python (no vLLM import) so its checks run in the main environment's tests;
`vllm_plugin` is the vLLM side, loaded by vLLM through the `vllm.general_plugins` entry point;
`vllm_stats` measures a loaded vLLM model from inside its worker (weights held, time per module).
"""
