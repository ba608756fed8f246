"""cryoformer.simulation"""
