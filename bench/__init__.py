"""Benchmarks of tiexport against the floor (``onnx.load``, a bare ONNX Runtime run, a float training step) and the
peers (Polygraphy lint, onnxslim, torch.ao QAT). ``python bench/run_all.py`` runs them all and writes
``bench/RESULTS.md``; ``--quick`` only checks that every script runs, on tiny inputs.
"""
