'''The family canonizers: one module per architecture family, each importing only the core of the package.'''
