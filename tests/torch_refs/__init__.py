"""PyTorch reference models for the parity tests, each written to follow one source exactly.

official.py: Jongchan/attention-module `ResidualNet` (CBAM, BAM; ImageNet and CIFAR stems).
common.py:   luuuyi/CBAM.PyTorch, the common "blog" variant, in both key styles.
pytorchcv.py: pytorchcv/imgclsmob `cbam_resnet*` with a global pool (the zoo tests' small model; the
             parity tests use the pytorchcv package itself, tests/test_convert_pytorchcv.py).
timm and torchvision are their own references (the installed packages).
"""
