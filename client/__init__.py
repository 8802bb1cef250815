"""The Flower ClientApp: trains its partition and pushes a delta to the parameter server."""
