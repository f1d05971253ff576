"""moechat.export"""
