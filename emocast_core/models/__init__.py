"""The EmoCAST networks. Module paths and parameter names follow the released `net.pth`."""
