"""cryoformer.metrics"""
