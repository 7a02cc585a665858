"""Encoders the server runs queries through, behind one interface: text -> (B, D), image -> (B, D).

``onnx``: ``OnnxEncoder``, an ``mmlm convert --to onnx`` folder run by ONNX Runtime with ``tokenizers``,
NumPy and Pillow; it imports no torch (nor any mmlm module that does), so a server that uses it starts
without loading torch. Nothing is imported here, so that stays true for whoever imports the package.
"""
