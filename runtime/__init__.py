"""moechat.runtime"""
