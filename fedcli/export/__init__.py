"""`fedcli export`: the verified global model as ONNX for a scoring system, with a model card (docs/risk.md)."""
