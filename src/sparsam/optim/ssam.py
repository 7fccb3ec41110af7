from .sam import SAM
class SSAM(SAM):
    pass
