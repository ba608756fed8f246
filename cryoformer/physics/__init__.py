"""cryoformer.physics"""
