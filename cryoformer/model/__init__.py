"""cryoformer.model"""
