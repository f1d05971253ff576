"""moechat.models"""
