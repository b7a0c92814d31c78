"""The real test bed: Docker engines 20.10 and 26.1, a loopback registry, stand-in images.

Install it with testbed/install.sh (as root) before use.
"""
