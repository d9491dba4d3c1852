"""The torch-free runtime: open a source on a backend (open.py), run strategies over its graphs (model.py,
classifier.py). Only torch_backend.py reaches the torch side, and only when the torch backend is chosen."""
