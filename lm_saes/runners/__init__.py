"""One runner per CLI verb; each takes typed settings and is what the Python API calls too."""
