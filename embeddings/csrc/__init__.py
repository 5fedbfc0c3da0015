"""C++ sources of rayrec's CPU kernels and the one function that builds them (``build.py``)."""
